"""The vision-encoder cache of image2text (VISION_CACHE_BYTES), on the tiny Qwen2.5-VL model."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hunyuan_service.api.app import create_app
from hunyuan_service.models.base import JobContext
from tests.e2e.conftest import tiny_settings
from tests.images import data_uri, encoded
from tests.metrics import value


def noise(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def load(cache: Path, **options: Any) -> Any:
    from hunyuan_service.models.qwen_vl import QwenVLModel

    model = QwenVLModel(tiny_settings("image2text", cache, **options))
    model.load()
    return model


def ask(model: Any, *turns: tuple[str, tuple[Image.Image, ...]], **options: Any) -> Any:
    """Greedy answer to a chat whose user turns carry these texts and images."""
    from hunyuan_service.media import decode_image
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    messages = []
    for i, (text, images) in enumerate(turns):
        if i:
            messages.append(ChatMessage("assistant", "noted"))
        decoded = tuple(
            decode_image(encoded(image, "PNG"), f"images[{n}]", model.settings)
            for n, image in enumerate(images)
        )
        messages.append(ChatMessage("user", text, decoded))
    options.setdefault("max_new_tokens", 10)
    request = Image2TextInput(tuple(messages), **options)
    return model.infer(request, JobContext())


@pytest.fixture(scope="module")
def cached(tiny_cache: Path) -> Any:
    return load(tiny_cache)


@pytest.fixture(scope="module")
def uncached(tiny_cache: Path) -> Any:
    return load(tiny_cache, vision_cache_bytes=0)


def test_a_repeated_image_skips_the_encoder_and_the_answer_is_the_same(
    cached: Any, uncached: Any
) -> None:
    picture = noise(1)
    before = cached.images.encoded
    first = ask(cached, ("What is this?", (picture,)))
    again = ask(cached, ("And the colours?", (picture,)))
    assert cached.images.encoded == before + 1  # the second request found its features
    assert (first.text, again.text) == (
        ask(uncached, ("What is this?", (picture,))).text,
        ask(uncached, ("And the colours?", (picture,))).text,
    )
    assert first.prompt_tokens == ask(uncached, ("What is this?", (picture,))).prompt_tokens


def test_a_later_turn_of_the_same_chat_reuses_the_image(cached: Any, uncached: Any) -> None:
    picture, other = noise(2), noise(3)
    ask(cached, ("Look.", (picture,)))
    before = cached.images.encoded
    answer = ask(cached, ("Look.", (picture,)), ("Now this one.", (other,)))
    assert cached.images.encoded == before + 1  # only the new image went through the encoder
    expected = ask(uncached, ("Look.", (picture,)), ("Now this one.", (other,)))
    assert (answer.text, answer.prompt_tokens) == (expected.text, expected.prompt_tokens)


def test_other_pixels_or_other_resize_bounds_are_misses(cached: Any) -> None:
    picture = noise(4, (200, 160))
    ask(cached, ("Hm.", (picture,)))
    before = cached.images.encoded
    changed = np.asarray(picture).copy()
    changed[0, 0, 0] ^= 1  # one bit of one pixel
    ask(cached, ("Hm.", (Image.fromarray(changed),)))
    assert cached.images.encoded == before + 1
    small = ask(cached, ("Hm.", (picture,)), max_pixels=4 * 28 * 28)
    assert cached.images.encoded == before + 2  # the same pixels, resized otherwise
    assert small.prompt_tokens < ask(cached, ("Hm.", (picture,))).prompt_tokens
    assert cached.images.encoded == before + 2


def test_off_every_image_is_encoded_and_nothing_is_kept(uncached: Any) -> None:
    picture = noise(5)
    before = uncached.images.encoded
    ask(uncached, ("One.", (picture,)))
    ask(uncached, ("Two.", (picture,)))
    assert uncached.images.encoded == before + 2
    assert uncached.images.cache.stats()["entries"] == 0


def test_a_batch_answers_each_row_as_alone(cached: Any, uncached: Any) -> None:
    from hunyuan_service.media import decode_image
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    def request(seed: int, text: str) -> Image2TextInput:
        image = decode_image(encoded(noise(seed), "PNG"), "images[0]", cached.settings)
        return Image2TextInput((ChatMessage("user", text, (image,)),), max_new_tokens=8)

    rows = [request(6, "First?"), request(7, "Second, longer question here?")]
    outputs = cached.infer_batch(rows, [JobContext(), JobContext()])
    alone = [uncached.infer(row, JobContext()) for row in rows]
    assert [o.text for o in outputs] == [a.text for a in alone]
    assert [o.prompt_tokens for o in outputs] == [a.prompt_tokens for a in alone]


@pytest.fixture(scope="module")
def continuous_client(tiny_cache: Path) -> Iterator[TestClient]:
    settings = tiny_settings("image2text", tiny_cache, max_batch_size=4)
    with TestClient(create_app(settings)) as client:
        yield client


def chat(client: TestClient, picture: Image.Image, question: str) -> Any:
    uri = data_uri(encoded(picture, "PNG"))
    body = {
        "model": "tiny",
        "max_tokens": 8,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": question},
                ],
            }
        ],
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_continuous_decoder_counts_hits_in_metrics(
    continuous_client: TestClient, uncached: Any
) -> None:
    labels = {"cache": "vision"}

    def lookups(outcome: str) -> float:
        text = continuous_client.get("/metrics").text
        return value(text, "hunyuan_cache_lookups_total", outcome=outcome, **labels)

    picture = noise(8)
    hits, misses = lookups("hit"), lookups("miss")
    first = chat(continuous_client, picture, "What is it?")
    again = chat(continuous_client, picture, "What is it?")
    assert (lookups("hit"), lookups("miss")) == (hits + 1, misses + 1)
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    expected = ask(uncached, ("What is it?", (picture,)), max_new_tokens=8)
    assert first["choices"][0]["message"]["content"] == expected.text
    assert first["usage"]["prompt_tokens"] == expected.prompt_tokens
    text = continuous_client.get("/metrics").text
    assert value(text, "hunyuan_cache_bytes", **labels) > 0
    assert value(text, "hunyuan_cache_entries", **labels) >= 1


def test_the_digest_is_made_when_the_image_is_decoded() -> None:
    from hunyuan_service.media import DIGEST_KEY, content_digest, decode_image
    from hunyuan_service.settings import Settings

    settings = Settings(_env_file=None, model_type="image2text", model_id="tiny")
    data = encoded(noise(9), "PNG")
    image = decode_image(data, "images[0]", settings)
    assert image.info[DIGEST_KEY][0] == id(image)
    assert content_digest(decode_image(data, "images[0]", settings)) == content_digest(image)
    other = decode_image(encoded(noise(10), "PNG"), "images[0]", settings)
    assert content_digest(other) != content_digest(image)
    derived = image.resize((40, 40))  # Pillow copies `info`; the digest is not the copy's
    assert content_digest(derived) != content_digest(image)
    fresh = Image.open(io.BytesIO(data)).convert("RGB")  # not decoded by the service
    assert content_digest(fresh) == content_digest(fresh.copy())  # then: its pixels'

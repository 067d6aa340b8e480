"""FLUX image edits on the tiny model: image-to-image and inpainting on /infer, /v1/jobs and
OpenAI's /v1/images/edits (through the official SDK)."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.e2e.test_jobs import wait_done
from tests.images import data_uri, encoded


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def half_mask(size: tuple[int, int], mode: str = "L") -> Image.Image:
    """White (repaint) on the left half, black (keep) on the right."""
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return mask.convert(mode)


def uri(image: Image.Image) -> str:
    return data_uri(encoded(image, "PNG"))


def pixels(response: Any, key: str = "image_base64") -> np.ndarray:
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()[key])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def edit(client: TestClient, image: Image.Image, **fields: Any) -> Any:
    body = {"prompt": "a lighthouse", "image": uri(image), "seed": 4, "num_inference_steps": 4}
    return client.post("/infer", json={**body, **fields})


def test_image_to_image_takes_the_image_size_and_is_reproducible(flux_client: TestClient) -> None:
    source = noise((96, 64))
    first = pixels(edit(flux_client, source))
    assert first.shape == (64, 96, 3)  # the image's size, with no width and height sent
    assert np.array_equal(first, pixels(edit(flux_client, source)))  # same seed, same image
    assert not np.array_equal(first, pixels(edit(flux_client, source, strength=1.0)))
    assert not np.array_equal(first, pixels(edit(flux_client, noise((96, 64), seed=1))))
    text_only = flux_client.post(
        "/infer",
        json={"prompt": "a lighthouse", "seed": 4, "num_inference_steps": 4, "width": 96,
              "height": 64},
    )  # fmt: skip
    assert not np.array_equal(first, pixels(text_only))


def test_a_light_edit_stays_closer_to_the_image_than_a_strong_one(flux_client: TestClient) -> None:
    # A smooth image: the tiny VAE's round trip keeps its broad shape.
    source = Image.new("RGB", (64, 64), (200, 40, 40)).resize((64, 64))
    original = np.asarray(source, dtype=np.float64)
    light = pixels(edit(flux_client, source, strength=0.25)).astype(np.float64)
    strong = pixels(edit(flux_client, source, strength=1.0)).astype(np.float64)
    assert np.abs(light - original).mean() < np.abs(strong - original).mean()


def test_progress_counts_the_steps_an_edit_runs(flux_client: TestClient) -> None:
    from tests.sse import parse_sse

    response = flux_client.post(
        "/infer",
        json={"prompt": "p", "image": uri(noise((64, 64))), "num_inference_steps": 8,
              "strength": 0.5, "stream": True},
    )  # fmt: skip
    assert response.status_code == 200
    events = [event for event in parse_sse(response.text) if event[0] != "comment"]
    progress = [data for name, data in events if name == "progress"]
    assert [(p["step"], p["total"]) for p in progress] == [(i, 4) for i in range(1, 5)]
    assert events[-1][0] == "result"


def test_sizes_sent_resize_the_image_and_odd_sizes_round_down(flux_client: TestClient) -> None:
    resized = pixels(edit(flux_client, noise((96, 64)), width=64, height=128))
    assert resized.shape == (128, 64, 3)
    rounded = pixels(edit(flux_client, noise((100, 70))))
    assert rounded.shape == (64, 96, 3)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])  # RGBA: opaque, as a canvas saves it
def test_inpainting_keeps_every_unmasked_pixel(flux_client: TestClient, mode: str) -> None:
    source = noise((96, 64), seed=2)
    result = pixels(edit(flux_client, source, mask=uri(half_mask((96, 64), mode))))
    original = np.asarray(source)
    assert np.array_equal(result[:, 48:], original[:, 48:])  # black: exactly as sent
    assert not np.array_equal(result[:, :48], original[:, :48])  # white: repainted


def test_a_transparent_mask_is_read_as_openai_reads_it(flux_client: TestClient) -> None:
    source = noise((64, 64), seed=3)
    # OpenAI's masks: the image itself, with the part to edit made transparent.
    mask = source.convert("RGBA")
    alpha = np.full((64, 64), 255, dtype=np.uint8)
    alpha[:32] = 0  # the top half is transparent: repaint it
    mask.putalpha(Image.fromarray(alpha))
    result = pixels(edit(flux_client, source, mask=uri(mask)))
    original = np.asarray(source)
    assert np.array_equal(result[32:], original[32:])
    assert not np.array_equal(result[:32], original[:32])


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"mask": "MASK"}, "mask", "must be the image's size"),
        ({"image": None, "mask": "MASK"}, "mask", "needs an image"),
        ({"image": None, "strength": 0.5}, "strength", "applies to an image edit"),
        ({"strength": 0}, "strength", "greater than 0"),
        ({"strength": 1.5}, "strength", "less than or equal to 1"),
        ({"image": base64.b64encode(b"not an image").decode()}, "image", "not a readable image"),
        ({"image": "IMAGE16"}, "image", "too small"),
        # One side alone would leave the other at its default (1024), stretching the image.
        ({"width": 64}, "height", "send height too, or neither"),
        ({"height": 128}, "width", "send width too, or neither"),
    ],
)
def test_bad_edits_are_422s_that_name_the_field(
    flux_client: TestClient, fields: dict[str, Any], param: str, words: str
) -> None:
    replaced = {
        "MASK": uri(half_mask((32, 32))),  # the image is 64x64
        "IMAGE16": uri(noise((40, 12))),  # 32x0 after rounding down
    }
    body = {"prompt": "p", "image": uri(noise((64, 64)))}
    for key, value in fields.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = replaced.get(value, value) if isinstance(value, str) else value
    response = flux_client.post("/infer", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]


def test_a_job_edits_as_infer_does(flux_client: TestClient) -> None:
    source = noise((64, 64), seed=5)
    body = {"prompt": "a lighthouse", "image": uri(source), "mask": uri(half_mask((64, 64))),
            "seed": 9, "num_inference_steps": 4}  # fmt: skip
    submitted = flux_client.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    done = wait_done(flux_client, submitted.json()["id"])
    assert done["status"] == "succeeded", done
    direct = flux_client.post("/infer", json=body)
    assert done["result"]["image_base64"] == direct.json()["image_base64"]
    result = np.asarray(Image.open(io.BytesIO(base64.b64decode(direct.json()["image_base64"]))))
    assert np.array_equal(result[:, 32:], np.asarray(source)[:, 32:])


def test_the_openai_edits_endpoint_refuses_what_it_cannot_do(flux_client: TestClient) -> None:
    png = encoded(noise((64, 64)), "PNG")
    as_json = flux_client.post(
        "/v1/images/edits", json={"prompt": "p", "image": uri(noise((64, 64)))}
    )
    assert as_json.status_code == 415
    assert "multipart/form-data" in as_json.json()["error"]["message"]
    cases = [
        ([("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))], "image"),
        ([("mask", ("m.png", png, "image/png"))], "image"),
        ([("image", ("a.png", png, "image/png")), ("n", (None, "99"))], "n"),
        ([("image", ("a.png", png, "image/png")), ("response_format", (None, "url"))], None),
        ([("image", ("a.png", b"not a png", "image/png"))], "image"),
    ]
    for files, param in cases:
        response = flux_client.post("/v1/images/edits", data={"prompt": "p"}, files=files)
        assert response.status_code == 400, (files, response.text)
        if param is not None:
            assert response.json()["error"]["param"] == param, response.text

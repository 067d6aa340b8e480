"""image2text's images are resized for the model on the CPU pool as they are decoded, not on the
model thread, where the resize held up every job running there; the encoder sees the same pixels
either way."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hunyuan_service.api.app import create_app
from tests.e2e.conftest import tiny_settings
from tests.images import data_uri, encoded


def ask_recording(
    cache: Path, body: dict[str, Any], path: str = "/infer"
) -> tuple[dict[str, Any], list[str], list[Any]]:
    """The answer, the threads qwen_vl_utils resized on, and the pixels the encoder got."""
    import qwen_vl_utils

    from hunyuan_service.models.vision import Encoding

    threads: list[str] = []
    pixels: list[Any] = []
    resize, start = qwen_vl_utils.fetch_image, Encoding._start

    def resizing(element: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return resize(element, *args, **kwargs)

    def encoding(self: Any) -> Any:
        pixels.append(self.pixels.clone())
        return start(self)

    settings = tiny_settings("image2text", cache, vision_cache_bytes=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qwen_vl_utils, "fetch_image", resizing)
        patch.setattr(Encoding, "_start", encoding)
        with TestClient(create_app(settings)) as client:
            response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json(), threads, pixels


def test_an_image_is_resized_off_the_model_thread_into_the_same_encoder_input(
    tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hunyuan_service.models.qwen_vl import QwenVLModel

    rng = np.random.default_rng(5)
    picture = Image.fromarray(rng.integers(0, 256, (150, 230, 3), dtype=np.uint8))
    sized = Image.fromarray(rng.integers(0, 256, (112, 84, 3), dtype=np.uint8))  # 28 x (3, 4)
    body = {
        "prompt": "Describe both.",
        "images": [data_uri(encoded(picture, "PNG")), data_uri(encoded(sized, "PNG"))],
        "max_new_tokens": 8,
    }
    now, threads, pixels = ask_recording(tiny_cache, body)
    # The first image resized once, on the CPU pool, and then found sized on the model thread;
    # the second, already at a size the resize gives, not resized anywhere.
    assert len(threads) == 1
    assert threads[0].startswith("hunyuan-cpu")

    monkeypatch.setattr(QwenVLModel, "prepare_image", lambda self, image, pixels, param: image)
    before, old_threads, old_pixels = ask_recording(tiny_cache, body)
    assert old_threads == ["hunyuan-model"]  # as it was: on the model thread
    assert len(pixels) == len(old_pixels) == 2
    assert all(a.equal(b) for a, b in zip(pixels, old_pixels, strict=True))
    assert (now["text"], now["usage"]) == (before["text"], before["usage"])


@pytest.mark.parametrize(
    ("path", "bounds"),
    [
        ("/infer", {"max_pixels": 12_544, "min_pixels": 3_136}),
        ("/v1/chat/completions", {"mm_processor_kwargs": {"max_pixels": 12_544}}),
    ],
)
def test_request_level_bounds_size_the_image_once_off_the_model_thread(
    tiny_cache: Path, path: str, bounds: dict[str, Any]
) -> None:
    # The model thread resizes again only if the bounds it computes differ from those the image
    # was prepared with; a request's own bounds (not an image's) must reach both the same way.
    picture = Image.fromarray(np.random.default_rng(6).integers(0, 256, (150, 230, 3), "uint8"))
    uri = data_uri(encoded(picture, "PNG"))
    if path == "/infer":
        body = {"prompt": "Describe.", "images": [uri], "max_new_tokens": 4, **bounds}
    else:
        content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "x"}]
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 4,
            **bounds,
        }
    _, threads, pixels = ask_recording(tiny_cache, body, path)
    assert len(threads) == 1
    assert threads[0].startswith("hunyuan-cpu")
    assert len(pixels) == 1
    # 12,544 pixels is 16 patches of 28x28: the encoder's input has 16 x 4 rows of 14x14 pixels
    assert pixels[0].shape[0] <= 16 * 4


def test_an_image_past_the_processors_own_cap_is_sized_to_it_once(tiny_cache: Path) -> None:
    """VL_MAX_PIXELS (1,003,520 by default) above the image processor's own cap (200,704 for
    the tiny demo's): the CPU pool sizes the image to the cap, and the processor, on the model
    thread, then leaves it as it is rather than resizing it a second time."""
    from hunyuan_service.models.qwen_vl import QwenVLModel
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    model = QwenVLModel(tiny_settings("image2text", tiny_cache))
    model.load()
    cap = model.processor.image_processor.size["longest_edge"]
    assert cap < model.settings.vl_max_pixels
    assert model.info.extra["vl_max_pixels"] == cap
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, (980, 1008, 3), np.uint8))
    sized = model.prepare_image(photo, (None, None), "images[0]")
    assert sized.width * sized.height <= cap
    request = Image2TextInput((ChatMessage("user", "Hi", (sized,)),), 2)
    (item,) = model._plan([request]).items["image"]
    # Patches of 14 pixels: the grid is the sized image's own, so the processor resized nothing.
    assert item.grid.tolist() == [[1, sized.height // 14, sized.width // 14]]

"""Speed options on the tiny models: lossless ones keep the eager output, compiled ones still
report progress, stream, cancel within a step, and serve sizes outside the warm-up set."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hunyuan_service.errors import JobCancelled, ModelLoadError
from hunyuan_service.models.base import JobContext
from tests.e2e.conftest import tiny_settings
from tests.e2e.test_interruption import StopAfter
from tests.images import png_bytes


def load_flux(cache: Path, **options: Any) -> Any:
    from hunyuan_service.models.flux import FluxModel

    model = FluxModel(tiny_settings("text2image", cache, **options))
    model.load()
    model.warm_up()
    return model


def load_qwen(cache: Path, **options: Any) -> Any:
    from hunyuan_service.models.qwen_vl import QwenVLModel

    model = QwenVLModel(tiny_settings("image2text", cache, **options))
    model.load()
    model.warm_up()
    return model


def draw(model: Any, width: int = 64, height: int = 64, ctx: JobContext | None = None) -> Any:
    from hunyuan_service.models.types import Text2ImageInput

    request = Text2ImageInput("a lighthouse", width, height, num_inference_steps=3, seed=11)
    return np.asarray(model.infer(request, ctx or JobContext()).image, dtype=np.float64)


def psnr(a: Any, b: Any) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def eager_image(flux: Any) -> Any:
    return draw(flux)


@pytest.mark.parametrize(
    "options",
    [{"fuse_qkv": True}, {"channels_last": True}, {"fuse_qkv": True, "channels_last": True}],
)
def test_lossless_flux_options_keep_the_eager_image(
    tiny_cache: Path, eager_image: Any, options: dict[str, Any]
) -> None:
    model = load_flux(tiny_cache, **options)
    assert np.abs(draw(model) - eager_image).max() <= 1
    assert all(model.info.extra[name] is True for name in options)


def test_int8_weight_only_stays_close_to_eager(tiny_cache: Path, eager_image: Any) -> None:
    model = load_flux(tiny_cache, quantize="int8")
    image = draw(model)
    assert image.shape == eager_image.shape
    assert psnr(image, eager_image) > 30
    assert model.info.extra["quantize"] == "int8"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantize": "fp8"}, "QUANTIZE=fp8 needs DEVICE=cuda"),
        ({"offload": "model"}, "OFFLOAD=model needs DEVICE=cuda"),
        ({"attention_backend": "no_such_kernel"}, "ATTENTION_BACKEND=no_such_kernel: "),
    ],
)
def test_options_the_device_cannot_run_fail_loading_with_one_line(
    tiny_cache: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_flux(tiny_cache, **options)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


# -- FLUX with regional compilation (one compile, about a minute on two cores) ------------------


@pytest.fixture(scope="module")
def compiled_flux(tiny_cache: Path) -> Any:
    return load_flux(tiny_cache, compile="regional", warmup=["64x64"])


def test_regional_compile_keeps_the_image_and_reports_every_step(
    compiled_flux: Any, eager_image: Any, caplog: pytest.LogCaptureFixture
) -> None:
    stop = StopAfter("progress", 10_000)
    with caplog.at_level(logging.WARNING, logger="hunyuan_service.models.speed"):
        image = draw(compiled_flux, ctx=stop.context())
    assert np.abs(image - eager_image).max() <= 2
    assert [d["step"] for _, d in stop.events] == [1, 2, 3]
    assert "compiling" not in caplog.text  # the warmed size needs no compiler


def test_regional_compile_stops_within_a_step(compiled_flux: Any) -> None:
    from hunyuan_service.models.types import Text2ImageInput

    stop = StopAfter("progress", 2)
    with pytest.raises(JobCancelled):
        compiled_flux.infer(
            Text2ImageInput("a fox", 64, 64, num_inference_steps=50), stop.context()
        )
    assert len(stop.events) == 2


def test_a_size_outside_warmup_is_served_and_logged_as_compiling(
    compiled_flux: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="hunyuan_service.models.speed"):
        image = draw(compiled_flux, width=80, height=48)
        draw(compiled_flux, width=80, height=48)
    assert image.shape == (48, 80, 3)
    assert caplog.text.count("compiling for shape 80x48x1") == 1


# -- Qwen2.5-VL with a static cache and a compiled decode step -----------------------------------


def ask(model: Any, ctx: JobContext, max_new_tokens: int = 12) -> Any:
    from hunyuan_service.media import decode_image
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    image = decode_image(png_bytes(), "images[0]", model.settings)
    message = ChatMessage("user", "Describe", (image,))
    return model.infer(Image2TextInput((message,), max_new_tokens=max_new_tokens), ctx)


def test_compiled_qwen_gives_the_eager_text_streamed_and_stops_within_a_token(
    tiny_cache: Path, qwen: Any
) -> None:
    compiled = load_qwen(tiny_cache, compile="full", warmup=["64x64"])
    assert compiled.model.generation_config.cache_implementation == "static"
    eager = ask(qwen, JobContext())
    free = StopAfter("token", 10_000)
    output = ask(compiled, free.context())
    assert output.text == eager.text
    assert "".join(d["text"] for _, d in free.events) == output.text
    stop = StopAfter("token", 2)
    with pytest.raises(JobCancelled):
        ask(compiled, stop.context(), max_new_tokens=40)
    assert len(stop.events) <= 3


def test_int8_qwen_generates(tiny_cache: Path) -> None:
    model = load_qwen(tiny_cache, quantize="int8")
    output = ask(model, JobContext(), max_new_tokens=5)
    assert output.completion_tokens >= 1
    assert model.info.extra["quantize"] == "int8"

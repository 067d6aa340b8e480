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
from tests.host_reads import HostReads
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


@pytest.mark.parametrize(
    "options",
    [
        {"compile_vae": True},
        {"compile": "regional", "compile_mode": "reduce-overhead", "compile_vae": True},
    ],
)
def test_compile_mode_and_the_compiled_vae_keep_the_eager_image(
    tiny_cache: Path, eager_image: Any, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    compiled: list[tuple[str, dict[str, Any]]] = []  # (module class, torch.compile's options)
    compile_module = torch.nn.Module.compile

    def recorded(module: Any, *args: Any, **kwargs: Any) -> None:
        compiled.append((type(module).__name__, kwargs))
        compile_module(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", recorded)
    model = load_flux(tiny_cache, warmup=["64x64"], **options)
    assert np.abs(draw(model) - eager_image).max() <= 1
    mode = options.get("compile_mode")
    expected = {"fullgraph": True} | ({"mode": mode} if mode else {})
    assert ("Decoder", expected) in compiled  # the VAE's decoder
    if "compile" in options:
        blocks = {name for name, kwargs in compiled if kwargs == expected} - {"Decoder"}
        assert blocks == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    assert model.info.extra["compile_vae"] is True
    assert model.info.extra["compile_mode"] == options.get("compile_mode", "default")


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


@pytest.mark.parametrize("decode_ahead", [False, True])
def test_compiled_qwen_gives_the_eager_text_streamed_and_stops_within_a_token(
    tiny_cache: Path, qwen: Any, decode_ahead: bool
) -> None:
    from hunyuan_service.models.compilations import compilations

    compiled = load_qwen(tiny_cache, compile="full", warmup=["64x64"], decode_ahead=decode_ahead)
    assert compiled.model.generation_config.cache_implementation == "static"
    warmed = compilations()
    eager = ask(qwen, JobContext())
    free = StopAfter("token", 10_000)
    output = ask(compiled, free.context())
    assert output.text == eager.text
    assert "".join(d["text"] for _, d in free.events) == output.text
    stop = StopAfter("token", 2)
    with pytest.raises(JobCancelled):
        ask(compiled, stop.context(), max_new_tokens=40)
    assert len(stop.events) <= 3
    assert compilations() == warmed  # the warmed-up shapes needed no compiler afterwards


def greedy_tokens(model: Any, count: int) -> list[int]:
    """The tokens `ask` would produce, read from `generate` itself."""
    import torch

    from hunyuan_service.media import decode_image
    from hunyuan_service.models.qwen_vl import _resize
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    image = decode_image(png_bytes(), "images[0]", model.settings)
    request = Image2TextInput((ChatMessage("user", "Describe", (image,)),))
    prompt, images = model._prompt(request)
    images = [_resize(image, model._pixel_bounds(request)) for image in images]
    inputs = model.processor(text=[prompt], images=images, return_tensors="pt")
    with torch.inference_mode():
        output = model.model.generate(**inputs, max_new_tokens=count, do_sample=False)
    return [int(t) for t in output[0, inputs["input_ids"].shape[1] :]]


def test_decoding_ahead_runs_one_step_past_the_end_and_undoes_it(tiny_cache: Path) -> None:
    plain, ahead = load_qwen(tiny_cache), load_qwen(tiny_cache, decode_ahead=True)
    tokens = greedy_tokens(plain, 12)
    # End generation at the first token that differs from all before it (not the first one).
    end = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    forwards = {}
    for name, model in (("plain", plain), ("ahead", ahead)):
        model.model.generation_config.eos_token_id = [tokens[end]]
        calls = [0]
        model.model.register_forward_pre_hook(
            lambda *_, calls=calls: calls.__setitem__(0, calls[0] + 1)
        )
        streamed = StopAfter("token", 10_000)
        output = ask(model, streamed.context(), max_new_tokens=12)
        assert output.completion_tokens == end + 1
        assert output.finish_reason == "stop"
        assert "".join(d["text"] for _, d in streamed.events) == output.text
        forwards[name] = (calls[0], output.text)
    assert forwards["ahead"][1] == forwards["plain"][1]
    assert forwards["plain"][0] == end + 1  # the prompt's pass gives the first token
    assert forwards["ahead"][0] == end + 2  # one more step ran before the end was read


def host_reads_per_token(model: Any) -> dict[tuple[str, str], float]:
    """Reads of a tensor's value by the host (each one waits for the device, on a GPU) per
    generated token, by (file, function), from two decodes of different lengths.

    Each length runs once uncounted first, so one-time reads (the image's encoder before the
    vision cache keeps it, a lazy initialisation) fall outside the difference."""
    counted = {}
    for tokens in (8, 40):
        assert ask(model, JobContext(), max_new_tokens=tokens).completion_tokens == tokens
        with HostReads() as count:
            assert ask(model, JobContext(), max_new_tokens=tokens).completion_tokens == tokens
        counted[tokens] = count.sites
    sites = set(counted[8]) | set(counted[40])
    per_token = {site: (counted[40][site] - counted[8][site]) / 32 for site in sites}
    return {site: n for site, n in per_token.items() if n}


@pytest.mark.parametrize("decode_ahead", [False, True])
def test_the_only_per_token_host_reads_are_the_stop_check_and_the_streamer(
    tiny_cache: Path, decode_ahead: bool
) -> None:
    model = load_qwen(tiny_cache, decode_ahead=decode_ahead)
    model.model.generation_config.eos_token_id = []  # decode exactly max_new_tokens
    stop_check = ("decode_ahead.py", "__call__") if decode_ahead else ("utils.py", "__call__")
    # With DECODE_AHEAD the stop check reads a copy made a step earlier, not the step's output.
    assert host_reads_per_token(model) == {stop_check: 1, ("rows.py", "put"): 1}


def test_int8_qwen_generates(tiny_cache: Path) -> None:
    model = load_qwen(tiny_cache, quantize="int8")
    output = ask(model, JobContext(), max_new_tokens=5)
    assert output.completion_tokens >= 1
    assert model.info.extra["quantize"] == "int8"

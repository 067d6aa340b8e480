"""LoRA hot-swap into a compiled FLUX transformer of real width, on a GPU: no recompilation.

A FLUX transformer with FLUX's own width (24 heads of 128) but 2 double and 4 single blocks, made
on the GPU in bf16, with rank-16 random LoRAs on its attention projections; COMPILE=regional.
Skipped where CUDA is absent. Run with `uv run pytest -m gpu tests/gpu/test_loras_gpu.py -s` to
see the timings it prints.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

pytestmark = pytest.mark.gpu
# cuBLAS picks reductions by workspace; a fixed one (read when its first handle is made, so
# before any test here uses CUDA) plus deterministic algorithms make a rerun bit-identical.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def deterministic() -> Any:
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def check_no_leak(base: np.ndarray, base_again: np.ndarray, after: np.ndarray) -> str:
    """The base image after adapter requests equals the base image: exactly where reruns are
    exact, else within the rerun noise."""
    noise = int(np.abs(base_again - base).max())
    moved = int(np.abs(after - base).max())
    if noise == 0:
        assert moved == 0, f"the base image moved by {moved} after adapter requests"
    else:
        assert moved <= max(2 * noise, 2), f"moved {moved}; reruns differ by {noise}"
    return f"base reruns differ by {noise}; base after adapters differs by {moved}"


def real_width_pipeline(tmp_path: Path) -> Any:
    """A bf16 FLUX pipeline on the GPU with FLUX's transformer width, and two rank-16 LoRAs."""
    from hunyuan_service.models.tiny import FluxShape, build_flux, build_flux_lora

    shape = FluxShape(
        layers=2, single_layers=4, heads=24, head_dim=128, axes_dims_rope=(16, 56, 56)
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            pipe = build_flux(shape)
    finally:
        torch.set_default_dtype(previous)
    for seed, name in ((1, "style"), (2, "subject")):
        build_flux_lora(pipe.transformer, tmp_path / f"{name}.safetensors", seed=seed, rank=16)
    return pipe


def serve(pipe: Any, lora_dir: Path, **options: Any) -> Any:
    from hunyuan_service.models.flux import FluxModel
    from hunyuan_service.settings import Settings

    settings = Settings(
        _env_file=None,
        model_type="text2image",
        model_id="tiny",
        device="cuda",
        lora_dir=lora_dir,
        warmup=["512x512"],
        **options,
    )
    model = FluxModel(settings)
    model.adopt(pipe)
    model.warm_up()
    return model


def drawer(model: Any) -> Any:
    from hunyuan_service.models.base import JobContext
    from hunyuan_service.models.types import Text2ImageInput

    def run(*loras: tuple[str, float]) -> tuple[np.ndarray, float]:
        request = Text2ImageInput(
            "a lighthouse", 512, 512, num_inference_steps=4, seed=3, loras=tuple(sorted(loras))
        )
        torch.cuda.synchronize()
        begin = time.perf_counter()
        output = model.infer(request, JobContext())
        torch.cuda.synchronize()
        return np.asarray(output.image, dtype=np.int16), time.perf_counter() - begin

    return run


def report(line: str) -> None:
    sys.stderr.write(f"\nGPU LoRA ({torch.cuda.get_device_name()}): {line}\n")


def lora_layers(model: Any) -> list[Any]:
    return [m for m in model.pipe.transformer.modules() if hasattr(m, "lora_A") and m.lora_A]


def test_eager_switching_leaves_the_base_path(tmp_path: Path) -> None:
    model = serve(real_width_pipeline(tmp_path), tmp_path)
    run = drawer(model)
    base, _ = run()
    base_again, base_s = run()
    style, style_s = run(("style", 1.0))
    assert all(not layer.disable_adapters for layer in lora_layers(model))
    run(("style", 0.8), ("subject", 1.0))
    after, _ = run()
    # The base request runs with every LoRA layer bypassed, whatever ran before it.
    assert all(layer.disable_adapters for layer in lora_layers(model))
    verdict = check_no_leak(base, base_again, after)
    report(
        f"eager: base {base_s:.3f} s, with an adapter {style_s:.3f} s; {verdict}; an adapter "
        f"moves the image by {int(np.abs(style - base).max())}"
    )


def test_hot_swapping_real_width_adapters_never_recompiles(tmp_path: Path) -> None:
    import torch._dynamo.utils

    pipe = real_width_pipeline(tmp_path)
    started = time.perf_counter()
    model = serve(pipe, tmp_path, compile="regional")
    compiled_s = time.perf_counter() - started
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    run = drawer(model)
    base, _ = run()
    base_again, base_s = run()
    style, _ = run(("style", 1.0))
    _, style_s = run(("style", 1.0))  # no swap: the slots already hold it
    _, both_s = run(("style", 0.8), ("subject", 1.0))  # swaps: slot 0 rescaled, slot 1
    after, after_s = run()  # swaps both slots back to zeros
    swap = model.adapters
    begin = time.perf_counter()
    swap.apply((("subject", 0.5),))
    torch.cuda.synchronize()
    swap_ms = (time.perf_counter() - begin) * 1000
    lora_max = max(
        float(p.detach().abs().max())
        for n, p in model.pipe.transformer.named_parameters()
        if "slot1" in n
    )
    verdict = check_no_leak(base, base_again, after)
    report(
        f"compiled: warm-up with compile {compiled_s:.1f} s; 512x512 4 steps: base {base_s:.3f} "
        f"s, same adapter {style_s:.3f} s, two adapters swapped in {both_s:.3f} s, back to base "
        f"{after_s:.3f} s; one swap alone {swap_ms:.1f} ms; graphs {graphs} before, "
        f"{torch._dynamo.utils.counters['stats']['unique_graphs']} after; {verdict}; "
        f"slot 1 after the last swap, max |w| {lora_max:.3g}; an adapter moves the image by "
        f"{int(np.abs(style - base).max())}"
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "recompiled"
    # What the slots hold is what the request asked for: subject at 0.5 in slot 0, zeros after.
    slots = swap._slot_parameters()
    for key, parameter in slots[0].items():
        expected = swap.canonical["subject"][key].to(parameter.device, parameter.dtype)
        if ".lora_B." in key:
            expected = expected * 0.5
        assert torch.equal(parameter, expected), key
    assert all(not p.any() for slot in slots[1:] for p in slot.values())
    swap.apply(())
    assert all(not p.any() for slot in slots for p in slot.values())

"""Real-size model speed: diffusers and transformers called directly, against the service's model
classes with each speed option, and the whole service over HTTP, all in one run on one device.

The GPU machine reaches no model hub, so the real architectures (FLUX.1-dev and -schnell,
Qwen2.5-VL-7B and -3B) are built with random weights directly on the device; speed does not
depend on weight values. Each variant gets the same weights (the same seed), so its output can be
compared with the baseline's: PSNR for images, the share of equal tokens for text.

    python bench/gpu.py --quick                     # the headline table, under 8 min on an H100
    python bench/gpu.py                             # also schnell, 3B, int8, offload, caches
    uv run python bench/gpu.py --device cpu --tiny  # the tiny models (a test runs this)

Results print as they come (a timeout still leaves numbers) and go to OUT/gpu.json and
OUT/gpu.md; OUT is --out, or $OUT where set, or bench/results.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/continuous_feed.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/gpu_profile.py, run as a script

from gpu_concurrency import concurrency_section
from gpu_profile import profile, save
from hunyuan_service.models.tiny import FluxShape, QwenVLShape

# Published config.json values of the checkpoints (checked 2026-11-27).
T5_XXL = {
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
}
CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
}
FLUX_DEV = FluxShape(
    layers=19,
    single_layers=38,
    heads=24,
    head_dim=128,
    axes_dims_rope=(16, 56, 56),
    guidance_embeds=True,
    t5=T5_XXL,
    t5_vocab=32128,
    clip=CLIP_L,
    clip_vocab=49408,
    vae_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    vae_norm_groups=32,
)
FLUX_SCHNELL = replace(FLUX_DEV, guidance_embeds=False)
QWEN_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "window_size": 112,
}
QWEN_7B = QwenVLShape(
    hidden_size=3584,
    layers=28,
    heads=28,
    kv_heads=4,
    intermediate_size=18944,
    vocab_size=152064,
    word_tokens=151_643 - 256,  # a tokenizer of Qwen's size, for the cost of constrained decoding
    image_max_pixels=12845056,
    vision=QWEN_VISION,
)
# Records of free text and numbers, in an array that can't close within a benchmark's tokens
# (minItems), so the grammar is live at every step.
RECORDS_SCHEMA = {
    "type": "array",
    "minItems": 64,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "qty": {"type": "integer"},
            "price": {"type": "number"},
            "kind": {"enum": ["food", "tool", "other"]},
        },
        "required": ["name", "qty", "price", "kind"],
        "additionalProperties": False,
    },
}
QWEN_3B = replace(
    QWEN_7B,
    hidden_size=2048,
    layers=36,
    heads=16,
    kv_heads=2,
    intermediate_size=11008,
    vocab_size=151936,
    tie_word_embeddings=True,
)


@dataclass
class Plan:
    """What one run measures; --quick and --tiny shrink it."""

    device: str
    tiny: bool
    quick: bool
    budget_s: float
    size: int = 1024
    repeats: int = 2
    new_tokens: int = 128
    skip: list[str] = field(default_factory=list)
    profile: bool = False  # also one profiled call per service variant (bench/gpu_profile.py)
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


class Report:
    """Collects rows, prints each at once, and rewrites the JSON and markdown after every row."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out, self.meta, self.rows = out, meta, []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        print("RESULT " + json.dumps(row, default=str), flush=True)
        (self.out / "gpu.json").write_text(
            json.dumps({"meta": self.meta, "rows": self.rows}, indent=1, default=str)
        )
        (self.out / "gpu.md").write_text(self.markdown())

    def markdown(self) -> str:
        lines = [f"{key}: {value}" for key, value in self.meta.items()] + [""]
        columns = [
            "section",
            "variant",
            "s_per_image",
            "tok_per_s",
            "ttft_s",
            "vs_baseline",
            "quality",
            "peak_gib",
            "setup_s",
            "note",
        ]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + " --- |" * len(columns))
        for row in self.rows:
            lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
        return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


# -- device helpers ------------------------------------------------------------------------------


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def free(device: str) -> None:
    import torch

    gc.collect()
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def made_on(device: str, dtype: Any, seed: int) -> Iterator[None]:
    """Creates parameters directly on `device` in `dtype`: 17B parameters made on the CPU first
    would take minutes."""
    import torch

    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def settings_for(model_type: str, plan: Plan, **options: Any) -> Any:
    from hunyuan_service.settings import Settings

    return Settings(
        _env_file=None,
        model_type=model_type,
        model_id="tiny",  # never loaded: the benchmark hands the model its built weights
        device=plan.device,
        max_image_side=max(2048, plan.size),
        max_new_tokens_limit=max(2048, plan.new_tokens),
        request_timeout_s=3600,
        **options,
    )


def timed(device: str, fn: Callable[[], Any]) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


@dataclasses.dataclass(frozen=True)
class Rate:
    """Tokens per second, and what they measure: `decode` (after the first token) or, as a
    labelled fallback, the `whole call` (prefill included, so lower)."""

    per_s: float
    kind: str

    def __truediv__(self, other: Rate) -> float | None:
        """The ratio of two rates of the same kind; None for two different metrics."""
        return self.per_s / other.per_s if self.kind == other.kind else None

    def label(self) -> str:
        return "" if self.kind == "decode" else "; rate over the whole call, prefill included"


def decode_rate(tokens: int, whole_s: float, first_s: float) -> Rate:
    """Tokens per second after the first: (n - 1) over the time of n minus the time of 1.

    With few tokens on a busy CPU the difference can come out at or below zero; the rate over
    the whole call is the fallback then, labelled as such, and never divided by a decode rate.
    """
    span = whole_s - first_s
    if span > 0:
        return Rate((tokens - 1) / span, "decode")
    return Rate(tokens / whole_s, "whole call")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


# -- FLUX ----------------------------------------------------------------------------------------


def flux_section(name: str, shape: FluxShape, plan: Plan, report: Report) -> None:
    import numpy as np
    import torch

    from hunyuan_service.models.base import JobContext, resolve_dtype
    from hunyuan_service.models.flux import FluxModel
    from hunyuan_service.models.tiny import build_flux
    from hunyuan_service.models.types import Text2ImageInput

    dtype = resolve_dtype("auto", plan.device)
    setup_s, pipe = timed(plan.device, lambda: _build_flux(build_flux, shape, plan.device, dtype))
    pipe.set_progress_bar_config(disable=True)
    steps = 28 if shape.guidance_embeds else 4
    if plan.tiny:
        steps = 3
    guidance = 3.5 if shape.guidance_embeds else 0.0
    size = plan.size
    print(f"[{name}] built in {setup_s:.1f} s; {size}x{size}, {steps} steps", flush=True)

    def pipeline_image(steps_: int) -> Any:
        with torch.inference_mode():
            return pipe(
                prompt="a lighthouse at dusk",
                width=size,
                height=size,
                num_inference_steps=steps_,
                guidance_scale=guidance,
                max_sequence_length=512 if shape.guidance_embeds else 256,
                generator=torch.Generator("cpu").manual_seed(7),
            ).images[0]

    fresh_denoiser(pipe, plan.device, dtype)
    reset_peak(plan.device)
    warm_s, _ = timed(plan.device, lambda: pipeline_image(2))
    runs = [timed(plan.device, lambda: pipeline_image(steps)) for _ in range(plan.repeats)]
    baseline_s = median([t for t, _ in runs])
    baseline = np.asarray(runs[-1][1], dtype=np.float64)
    report.add(
        section=name,
        variant="diffusers FluxPipeline, eager (baseline)",
        s_per_image=baseline_s,
        vs_baseline=1.0,
        peak_gib=peak_gib(plan.device),
        setup_s=setup_s,
        note=f"first 2-step call {warm_s:.1f} s",
    )

    request = Text2ImageInput("a lighthouse at dusk", size, size, steps, guidance, seed=7)
    # Every variant but the cache's own encodes the prompt on each call, as the baseline does;
    # the cache's row primes it once, so each timed call is a hit.
    cached = {"prompt_cache_bytes": 64 * 2**20}
    variants: list[tuple[str, dict[str, Any], float]] = [
        ("service, eager", {}, 0),
        ("service, eager, the prompt repeated (prompt-embedding cache hits)", cached, 20),
        (
            "service, lossless: fused QKV + channels-last + regional compile",
            {"fuse_qkv": True, "channels_last": True, "compile": "regional"},
            90,
        ),
    ]
    if plan.device == "cuda":
        # cuDNN's attention on Hopper is the fastest lossless kernel installed on the lent
        # machines (flash-attn 3 is not); attention is about a tenth of FLUX's arithmetic at
        # 1024x1024.
        variants.append(
            (
                "service, lossless + cuDNN attention",
                {
                    "fuse_qkv": True,
                    "channels_last": True,
                    "compile": "regional",
                    "attention_backend": "_native_cudnn",
                },
                90,
            )
        )
        variants.append(
            (
                "service, + fp8 (lossy)",
                {"fuse_qkv": True, "channels_last": True, "compile": "regional", "quantize": "fp8"},
                320,  # its warm-up compiled for 289 s on the H100 (run 1)
            )
        )
    if not plan.quick:
        variants += [
            ("service, cuDNN attention", {"attention_backend": "_native_cudnn"}, 30),
            ("service, int8 weight-only (lossy)", {"quantize": "int8"}, 90),
            ("service, first-block cache 0.08 (lossy)", {"step_cache_threshold": 0.08}, 30),
            ("service, full compile", {"compile": "full", "fuse_qkv": True}, 240),
            ("service, model offload", {"offload": "model"}, 90),
        ]
        # Issue 22's step experiments (docs/performance.md), each against the lossless set.
        lossless = {"fuse_qkv": True, "channels_last": True}
        variants += [
            (
                "service, lossless + max-autotune",
                {**lossless, "compile": "regional", "compile_mode": "max-autotune-no-cudagraphs"},
                400,
            ),
            (
                "service, lossless + compiled VAE decoder",
                {**lossless, "compile": "regional", "compile_vae": True},
                150,
            ),
            (
                "service, lossless, full compile + CUDA graphs",
                {**lossless, "compile": "full", "compile_mode": "reduce-overhead"},
                300,
            ),
            (
                "service, lossless, full compile, max-autotune + CUDA graphs, compiled VAE",
                {
                    **lossless,
                    "compile": "full",
                    "compile_vae": True,
                    "compile_mode": "max-autotune",
                },
                600,
            ),
        ]
        if plan.device == "cpu":
            variants = [v for v in variants if "cuDNN" not in v[0] and "offload" not in v[0]]
    best: tuple[float, dict[str, Any]] = (baseline_s, {})
    model = last = None
    for label, options, needs_s in variants:
        if any(word in label for word in plan.skip):
            continue
        if plan.left() < needs_s + 30:
            report.add(section=name, variant=label, note="skipped: out of time budget")
            continue
        try:
            # Options change the transformer and VAE in place: each variant gets fresh ones, with
            # the baseline's weights.
            model = last = None
            fresh_denoiser(pipe, plan.device, dtype)
            settings = settings_for(
                "text2image",
                plan,
                warmup=[f"{size}x{size}"],
                **{"prompt_cache_bytes": 0, **options},
            )
            model = FluxModel(settings)
            reset_peak(plan.device)
            setup_s, _ = timed(plan.device, lambda: (model.adopt(pipe), model.warm_up()))  # noqa: B023
            if settings.prompt_cache_bytes:
                model.infer(request, JobContext())  # the prompt's embeddings, cached
            times, image = [], None
            for _ in range(plan.repeats):
                elapsed, output = timed(plan.device, lambda: model.infer(request, JobContext()))  # noqa: B023
                times.append(elapsed)
                image = np.asarray(output.image, dtype=np.float64)
            seconds = median(times)
            report.add(
                section=name,
                variant=label,
                s_per_image=seconds,
                vs_baseline=seconds / baseline_s,
                quality=_psnr(image, baseline),
                peak_gib=peak_gib(plan.device),
                setup_s=setup_s,
                note="setup = options + warm-up (compile)",
            )
            if plan.profile:
                two_steps = replace(request, num_inference_steps=2)
                found = profile(lambda: model.infer(two_steps, JobContext()), plan.device)  # noqa: B023
                add_profile(
                    report, name, label, found.line(2, "step"), save(found, report.out, name, label)
                )
            last = options
            if seconds < best[0] and options.get("offload") is None:
                best = (seconds, options)
        except Exception as error:  # one variant failing must not lose the others
            traceback.print_exc()
            report.add(section=name, variant=label, note=f"failed: {_first_line(error)}")
    if plan.left() > 60:
        # The last variant's model is still compiled and warm; any other must be made again.
        ready = model if last is best[1] else None
        model = None
        http_section(name, pipe, best[1], ready, request, plan, report)
    pipe = None
    free(plan.device)


def fresh_denoiser(pipe: Any, device: str, dtype: Any) -> None:
    """Replaces the pipeline's transformer and VAE by new ones with fixed-seed random weights."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    transformer_config, vae_config = pipe.transformer.config, pipe.vae.config
    pipe.transformer = None  # let the old weights go before the new ones are made
    pipe.vae = None
    free(device)
    with made_on(device, dtype, seed=3):
        pipe.transformer = FluxTransformer2DModel.from_config(transformer_config)
    with made_on(device, dtype, seed=4):
        pipe.vae = AutoencoderKL.from_config(vae_config)


def _build_flux(build_flux: Callable[[FluxShape], Any], shape: FluxShape, device: str, dtype: Any):
    with made_on(device, dtype, seed=1):
        return build_flux(shape)


def _psnr(image: Any, reference: Any) -> str:
    import numpy as np

    if image is None or image.shape != reference.shape:
        return "shape differs"
    mse = float(np.mean((image - reference) ** 2))
    flat = " (flat image)" if float(reference.std()) < 1 else ""
    return ("identical" if mse == 0 else f"PSNR {10 * math.log10(255**2 / mse):.1f} dB") + flat


def http_section(
    name: str,
    pipe: Any,
    options: dict[str, Any],
    ready: Any,
    request: Any,
    plan: Plan,
    report: Report,
) -> None:
    """The whole service over HTTP with the fastest lossless-or-not options found above, against
    the same model class called directly: what the service adds per request."""
    import httpx

    from hunyuan_service.api.app import create_app
    from hunyuan_service.api.encoding import base64_json_string, encode_image
    from hunyuan_service.models.base import JobContext
    from hunyuan_service.models.flux import FluxModel

    class Built(FluxModel):
        def load(self) -> None:  # the weights are already on the device
            self.adopt(pipe)

    try:
        import torch

        if ready is None:
            fresh_denoiser(pipe, plan.device, next(pipe.text_encoder.parameters()).dtype)
            warmup = [f"{plan.size}x{plan.size}"]
            settings = settings_for("text2image", plan, warmup=warmup, **options)
            model = Built(settings)
        else:
            settings = settings_for("text2image", plan, **options)
            model = ready
            model.load = lambda: None  # already adopted, compiled and warmed up
        body = {
            "prompt": request.prompt,
            "width": request.width,
            "height": request.height,
            "num_inference_steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale,
            "seed": request.seed,
        }
        with serve(create_app(settings, model)) as url, httpx.Client(timeout=3600) as client:
            label = ", ".join(f"{k}={v}" for k, v in options.items()) or "eager"
            for fmt in ("png", "jpeg"):
                direct, over_http, encoding = [], [], []
                for _ in range(plan.repeats):
                    with torch.inference_mode():
                        took, output = timed(
                            plan.device, lambda: model.infer(request, JobContext())
                        )
                        direct.append(took)
                    start = time.perf_counter()
                    response = client.post(f"{url}/infer", json={**body, "output_format": fmt})
                    over_http.append(time.perf_counter() - start)
                    response.raise_for_status()
                    # What the answer's encoding alone costs this host's CPU, for the breakdown.
                    start = time.perf_counter()
                    base64_json_string(encode_image(output.images[0], fmt))
                    encoding.append(time.perf_counter() - start)
                model_s, http_s = median(direct), median(over_http)
                report.add(
                    section=name,
                    variant=f"whole service over HTTP ({label}), {fmt} response",
                    s_per_image=http_s,
                    vs_baseline=None,
                    note=f"model class alone {model_s:.3f} s; service adds "
                    f"{100 * (http_s / model_s - 1):.1f}% ({len(response.content)} bytes; "
                    f"encoding it alone {1000 * median(encoding):.1f} ms)",
                )
    except Exception as error:
        traceback.print_exc()
        report.add(section=name, variant="whole service over HTTP", note=f"failed: {error}")


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Runs the app under uvicorn in a thread until the block ends; yields its URL once ready."""
    import httpx
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                break
        if not thread.is_alive():
            raise RuntimeError("the service exited while starting")
        time.sleep(0.2)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=60)


# -- Qwen2.5-VL ----------------------------------------------------------------------------------


def qwen_section(name: str, shape: QwenVLShape, plan: Plan, report: Report) -> None:
    import torch

    from hunyuan_service.models.base import JobContext, resolve_dtype
    from hunyuan_service.models.grammar import compile_response_format
    from hunyuan_service.models.qwen_vl import QwenVLModel
    from hunyuan_service.models.tiny import build_qwen_vl
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    dtype = resolve_dtype("auto", plan.device)

    def build() -> tuple[Any, Any]:
        with made_on(plan.device, dtype, seed=2):
            model, processor = build_qwen_vl(shape, dtype=dtype)
        # Random weights would stop at a random end-of-text token; time a fixed length instead.
        model.generation_config.eos_token_id = None
        return model.eval(), processor

    setup_s, (model, processor) = timed(plan.device, build)
    print(f"[{name}] built in {setup_s:.1f} s; {plan.new_tokens} new tokens", flush=True)
    text_prompt = "Describe the picture in detail, then list every object you can see."
    n = plan.new_tokens

    # Baseline: transformers' generate, eager, dynamic cache, called directly.
    processor.tokenizer.padding_side = "left"
    conversation = [{"role": "user", "content": [{"type": "text", "text": text_prompt}]}]
    prompt = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], return_tensors="pt").to(plan.device)
    width = inputs["input_ids"].shape[1]

    def generate(tokens: int) -> Any:
        with torch.inference_mode():
            return model.generate(
                **inputs,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
            )

    generate(n)  # the first long run grows the cache's allocations; time the later ones
    reset_peak(plan.device)
    first_s = median([timed(plan.device, lambda: generate(1))[0] for _ in range(plan.repeats)])
    runs = [timed(plan.device, lambda: generate(n)) for _ in range(plan.repeats)]
    baseline_rate = decode_rate(n, median([t for t, _ in runs]), first_s)
    baseline_tokens = runs[-1][1][0, width:].tolist()
    assert len(baseline_tokens) == n, f"the baseline made {len(baseline_tokens)} tokens, not {n}"
    baseline_text = processor.batch_decode(
        [baseline_tokens], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )[0]
    report.add(
        section=name,
        variant="transformers generate, eager (baseline)",
        tok_per_s=baseline_rate.per_s,
        vs_baseline=1.0,
        peak_gib=peak_gib(plan.device),
        setup_s=setup_s,
        note=f"decode rate: ({n} - 1) tokens over the time of {n} "
        f"minus the time of 1; text prompt, batch 1{baseline_rate.label()}",
    )

    side = plan.size
    pictures = iter(range(1, 10**6))

    def image_message() -> Any:
        """A question about an image never sent before: the vision cache cannot answer it."""
        return ChatMessage("user", "What is in this image?", (pattern(side, next(pictures)),))

    repeated = image_message()
    text_message = ChatMessage("user", text_prompt)
    variants: list[tuple[str, dict[str, Any], float]] = [
        ("service, eager", {}, 0),
        ("service, static cache + compiled decode (CUDA graph)", {"compile": "full"}, 120),
        (
            "service, compiled decode + decode ahead",
            {"compile": "full", "decode_ahead": True},
            120,
        ),
    ]
    if not plan.quick:
        variants.append(("service, int8 weight-only (lossy)", {"quantize": "int8"}, 60))
        if plan.device == "cuda":
            variants.append(
                (
                    "service, fp8 + compiled decode (lossy)",
                    {"quantize": "fp8", "compile": "full"},
                    240,
                )
            )
    served: Any = None
    for label, options, needs_s in variants:
        if any(word in label for word in plan.skip):
            continue
        if plan.left() < needs_s + 20:
            report.add(section=name, variant=label, note="skipped: out of time budget")
            continue
        try:
            served = None
            if options.get("quantize"):  # quantization replaces weights: start from fresh ones
                model = None
                free(plan.device)
                model, processor = build()
            free(plan.device)
            served = QwenVLModel(
                settings_for(
                    "image2text",
                    plan,
                    warmup=[f"{side}x{side}"],
                    vl_max_pixels=1280 * 28 * 28,
                    **options,
                )
            )
            reset_peak(plan.device)
            setup_s, _ = timed(
                plan.device,
                lambda: (served.adopt(model, processor), served.warm_up()),  # noqa: B023
            )

            outputs: list[Any] = []  # what the service answered to the latest text timings

            def run(message: Any, tokens: int, grammar: Any = None) -> float:
                """Times one call of the service's own `infer`; every call must produce exactly
                `tokens` tokens, or its time would measure something else."""
                request = Image2TextInput((message,), max_new_tokens=tokens, grammar=grammar)
                seconds, output = timed(plan.device, lambda: served.infer(request, JobContext()))  # noqa: B023
                if output.completion_tokens != tokens:
                    raise RuntimeError(
                        f"a timed call made {output.completion_tokens} tokens, not {tokens}"
                    )
                if grammar is None and message is text_message:
                    outputs.append(output)  # noqa: B023
                return seconds

            run(text_message, n)  # a compiled decode step recompiles once for a longer cache
            first = median([run(text_message, 1) for _ in range(plan.repeats)])
            rate = decode_rate(
                n, median([run(text_message, n) for _ in range(plan.repeats)]), first
            )
            served_text = outputs[-1].text
            if "constrained" not in plan.skip:
                # The same decode held to a JSON schema that never closes within n tokens.
                grammar = compile_response_format("json_schema", RECORDS_SCHEMA, "records")
                run(text_message, n, grammar)
                held = [run(text_message, n, grammar) for _ in range(plan.repeats)]
                held_rate = decode_rate(n, median(held), first)
                same_variant = held_rate / rate
                report.add(
                    section=name,
                    variant=f"{label} + JSON-schema constraint",
                    tok_per_s=held_rate.per_s,
                    vs_baseline=held_rate / baseline_rate,
                    note=(
                        f"{same_variant:.3f}x the same variant's decode rate without it"
                        if same_variant is not None
                        else "not comparable with the same variant's rate"
                    )
                    + f"; tokenizer of {len(processor.tokenizer)} tokens{held_rate.label()}",
                )
            ttft = median([run(image_message(), 1) for _ in range(plan.repeats)])
            run(repeated, 1)  # its features are kept from here on
            ttft_repeated = median([run(repeated, 1) for _ in range(plan.repeats)])
            report.add(
                section=name,
                variant=label,
                tok_per_s=rate.per_s,
                ttft_s=ttft,
                vs_baseline=rate / baseline_rate,
                quality=_agreement(served_text, baseline_text, n),
                peak_gib=peak_gib(plan.device),
                setup_s=setup_s,
                note=f"TTFT with one {side}x{side} image sent for the first time "
                f"(at most {served._max_pixels} pixels after resizing); the image repeated "
                f"(vision cache hit) {ttft_repeated:.3f} s, {ttft_repeated / ttft:.3f}x"
                f"{rate.label()}",
            )
            if plan.profile:
                # 32 tokens, prefill included: an eager 7B decode launches about a thousand
                # kernels per token, and the profiler's own processing grows with them.
                profiled = min(32, n)
                found = profile(lambda: run(text_message, profiled), plan.device)  # noqa: B023
                add_profile(
                    report,
                    name,
                    label,
                    found.line(profiled, "token"),
                    save(found, report.out, name, label),
                )
        except Exception as error:
            traceback.print_exc()
            report.add(section=name, variant=label, note=f"failed: {_first_line(error)}")
    served = model = None
    free(plan.device)


def pattern(side: int, seed: int) -> Any:
    """A side x side RGB test image with fine detail; each seed gives other pixels."""
    import numpy as np
    from PIL import Image

    x = np.arange(side * side, dtype=np.int64)[:, None] + seed * 101
    pixels = (x * np.array([7, 13, 29]) + seed) % 256
    return Image.fromarray(pixels.astype(np.uint8).reshape(side, side, 3))


def add_profile(report: Report, section: str, label: str, line: str, details: Path) -> None:
    report.add(section=section, variant=f"{label} [profiled once]", note=f"{line}; {details.name}")


def _agreement(served_text: str, baseline_text: str, tokens: int) -> str:
    """Whether the text the service answered in its timed calls equals the baseline's greedy
    text (both exactly `tokens` tokens long), and where they part if not."""
    if served_text == baseline_text:
        return f"same text as the baseline ({tokens} tokens)"
    first = next(
        (i for i, (a, b) in enumerate(zip(served_text, baseline_text, strict=False)) if a != b),
        min(len(served_text), len(baseline_text)),
    )
    return f"text differs from the baseline's at character {first} of {len(baseline_text)}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


# -- main ----------------------------------------------------------------------------------------


def versions(device: str) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.machine(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    with contextlib.suppress(ImportError):
        import torchao

        meta["torchao"] = torchao.__version__
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the headline table only")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="the tiny models (any device)")
    parser.add_argument("--only", default="", help="comma-separated sections to run")
    parser.add_argument("--skip", default="", help="skip variants whose label has any of these")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting new work after")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--profile", action="store_true", help="profile one call of each service variant"
    )
    args = parser.parse_args()
    skip = [word for word in args.skip.split(",") if word]
    plan = Plan(
        profile=args.profile,
        skip=skip,
        device=args.device,
        tiny=args.tiny,
        quick=args.quick,
        budget_s=args.budget_s or (450 if args.quick else 3000),
    )
    if args.tiny:
        plan.size, plan.new_tokens, plan.repeats = 64, 8, 1
    out = args.out or Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = Report(
        out, {**versions(plan.device), "mode": "quick" if args.quick else "full", "tiny": args.tiny}
    )
    print(json.dumps(report.meta), flush=True)
    tiny_flux, tiny_qwen = FluxShape(), QwenVLShape()
    sections: dict[str, Callable[[], None]] = {
        "flux-dev": lambda: flux_section(
            "FLUX.1-dev",
            replace(tiny_flux, guidance_embeds=True) if plan.tiny else FLUX_DEV,
            plan,
            report,
        ),
        "qwen-7b": lambda: qwen_section(
            "Qwen2.5-VL-7B", tiny_qwen if plan.tiny else QWEN_7B, plan, report
        ),
        "flux-schnell": lambda: flux_section(
            "FLUX.1-schnell", tiny_flux if plan.tiny else FLUX_SCHNELL, plan, report
        ),
        "qwen-concurrency": lambda: concurrency_section(
            "Qwen2.5-VL-7B, continuous batching", tiny_qwen if plan.tiny else QWEN_7B, plan, report
        ),
        "qwen-3b": lambda: qwen_section(
            "Qwen2.5-VL-3B", tiny_qwen if plan.tiny else QWEN_3B, plan, report
        ),
    }
    chosen = [s for s in args.only.split(",") if s] or (
        ["flux-dev", "qwen-7b", "qwen-concurrency"] if plan.quick else list(sections)
    )
    for name in chosen:
        if plan.left() < 30:
            report.add(section=name, note="skipped: out of time budget")
            continue
        try:
            sections[name]()
        except Exception as error:
            traceback.print_exc()
            report.add(section=name, note=f"failed: {_first_line(error)}")
    print()
    print(report.markdown(), flush=True)


if __name__ == "__main__":
    main()

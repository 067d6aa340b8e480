"""Speed options applied to a loaded model: attention, fusion, quantization, offload, compile.

Each option is a setting (docs/performance.md). What settings alone can rule out is refused in
`settings.py`; what depends on the device (fp8 needs compute capability 8.9, offload needs CUDA,
quantization needs torchao) is refused here, at load, with one line naming the fix.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Any

from hunyuan_service.errors import ModelLoadError
from hunyuan_service.models.decode_ahead import check_supported

if TYPE_CHECKING:
    from hunyuan_service.settings import Settings

logger = logging.getLogger(__name__)

STATIC_CACHE_TOKENS = 4096  # image2text with COMPILE=full: the KV cache's length at least
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper have fp8 matrix units; Ampere does not


def check_for_device(settings: Settings, device: str) -> None:
    """Refuses options the device or the installed packages cannot run."""
    import torch

    if settings.quantize != "none" and importlib.util.find_spec("torchao") is None:
        raise ModelLoadError(f"QUANTIZE={settings.quantize} needs the torchao package")
    if settings.quantize == "fp8":
        if device != "cuda":
            raise ModelLoadError("QUANTIZE=fp8 needs DEVICE=cuda; on CPU use QUANTIZE=int8")
        capability = torch.cuda.get_device_capability()
        if capability < FP8_MIN_CAPABILITY:
            raise ModelLoadError(
                f"QUANTIZE=fp8 needs compute capability 8.9 or newer (this GPU has "
                f"{capability[0]}.{capability[1]}); use QUANTIZE=int8"
            )
    if settings.offload != "none":
        if device != "cuda":
            raise ModelLoadError(f"OFFLOAD={settings.offload} needs DEVICE=cuda")
        if settings.quantize != "none":
            raise ModelLoadError(
                "OFFLOAD with QUANTIZE: choose one; QUANTIZE=int8 alone fits FLUX on a 24 GB card"
            )


def quantize(module: Any, kind: str, device: str | None = None) -> None:
    """Quantizes the Linear layers of `module` in place with torchao; with `device`, each layer
    moves there just before it is quantized, so the full-precision module is never there whole."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    if kind == "fp8":
        config: Any = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    elif kind == "int8":
        config = Int8WeightOnlyConfig()
    else:
        raise ValueError(f"unknown quantization {kind!r}")
    quantize_(module, config, device=device)


def speed_up_flux(pipe: Any, settings: Settings, device: str) -> dict[str, Any]:
    """Applies the text2image options to a loaded pipeline (in CPU memory, or already on its
    device when loaded straight there) and places it.

    Returns what /health reports. Order matters: attention and fusion change the modules that
    quantization then replaces, quantization moves the transformer to the device layer by
    layer before the rest follows, and compilation comes last, over the final modules.
    """
    import torch

    check_for_device(settings, device)
    transformer = pipe.transformer
    if settings.attention_backend != "native":
        try:
            transformer.set_attention_backend(settings.attention_backend)
        except Exception as error:  # diffusers raises ValueError or ImportError, worded for us
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ModelLoadError(
                f"ATTENTION_BACKEND={settings.attention_backend}: {first_line or type(error)}"
            ) from None
    if settings.fuse_qkv:
        transformer.fuse_qkv_projections()
        pipe.vae.fuse_qkv_projections()
    if settings.quantize != "none":
        # Layer by layer onto the device (the pipeline was loaded into CPU memory for this):
        # FLUX.1-dev's transformer is 24 GB in bf16 and 12 GB in int8, so on a 24 GB card
        # only the quantized one fits beside the text encoders.
        quantize(transformer, settings.quantize, device)
    if settings.offload == "none":
        pipe.to(device)
    else:
        _offload(pipe, settings.offload, device)
    if settings.channels_last:
        pipe.vae.to(memory_format=torch.channels_last)
    if settings.step_cache_threshold > 0:
        from diffusers.hooks import FirstBlockCacheConfig

        transformer.enable_cache(FirstBlockCacheConfig(threshold=settings.step_cache_threshold))
    options: dict[str, Any] = {"fullgraph": True}
    if settings.compile_mode != "default":
        options["mode"] = settings.compile_mode
    if settings.compile == "regional":
        # One compiled graph per block type, reused by all 57 blocks: about a tenth of the
        # compile time of the whole model, and nearly all of its speed-up.
        transformer.compile_repeated_blocks(**options)
    elif settings.compile == "full":
        transformer.compile(**options)
    if settings.compile_vae:
        # The decoder only: the VAE's encoder runs for image edits alone.
        pipe.vae.decoder.compile(**options)
    return speed_report(settings, "text2image")


def speed_up_qwen(model: Any, settings: Settings, device: str) -> dict[str, Any]:
    """Applies the image2text options to a loaded model already on its device."""
    check_for_device(settings, device)
    if settings.decode_ahead:
        check_supported()
    if settings.quantize != "none":
        quantize(model.model.language_model, settings.quantize)
    if settings.compile == "full":
        from transformers import CompileConfig

        # A static KV cache gives the decode step fixed shapes, so transformers compiles it (and
        # on CUDA captures it as a CUDA graph, which removes the per-layer launch overhead).
        compile_config = CompileConfig(
            fullgraph=False, mode="reduce-overhead" if device == "cuda" else "default"
        )
        compile_config._compile_all_devices = device != "cuda"  # type: ignore[assignment]
        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = compile_config
        # Size the cache for most requests up front: a longer one reallocates it and recompiles.
        model.generation_config.max_cache_len = STATIC_CACHE_TOKENS
    return speed_report(settings, "image2text")


def speed_report(settings: Settings, model_type: str) -> dict[str, Any]:
    report: dict[str, Any] = {"compile": settings.compile, "quantize": settings.quantize}
    if model_type == "image2text":
        report["decode_ahead"] = settings.decode_ahead
    if model_type == "text2image":
        report.update(
            attention_backend=settings.attention_backend,
            offload=settings.offload,
            fuse_qkv=settings.fuse_qkv,
            channels_last=settings.channels_last,
            step_cache_threshold=settings.step_cache_threshold,
            compile_mode=settings.compile_mode,
            compile_vae=settings.compile_vae,
        )
    return report


def _offload(pipe: Any, mode: str, device: str) -> None:
    """Keeps weights in CPU memory and brings them to the GPU when used, so FLUX fits 24 GB."""
    if mode == "model":  # whole components move in turn: small slowdown, about 24 GB peak
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":  # layer by layer: smallest footprint, slowest by far
        pipe.enable_sequential_cpu_offload(device=device)
    elif mode == "group":  # layers stream in on a side CUDA stream, overlapping compute
        from diffusers.hooks import apply_group_offloading

        for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
            apply_group_offloading(
                getattr(pipe, name),
                onload_device=device,
                offload_type="leaf_level",
                use_stream=True,
            )
    else:
        raise ValueError(f"unknown offload mode {mode!r}")


class CompiledShapes:
    """Remembers which shapes have compiled, so a request at a new one is logged as compiling."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seen: set[tuple[Any, ...]] = set()

    def note(self, shape: tuple[Any, ...], warming_up: bool = False) -> None:
        if not self.enabled or shape in self.seen:
            return
        self.seen.add(shape)
        if not warming_up:
            logger.warning(
                "compiling for shape %s (not in WARMUP); this request waits for the compiler",
                "x".join(str(part) for part in shape),
            )

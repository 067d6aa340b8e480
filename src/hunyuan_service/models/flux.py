"""FLUX text-to-image through diffusers' FluxPipeline."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from hunyuan_service.models.base import JobContext, TorchModel
from hunyuan_service.models.loading import quiet_hf_progress, resolve_checkpoint
from hunyuan_service.models.types import Text2ImageInput, Text2ImageOutput


@dataclass(frozen=True)
class FluxDefaults:
    """Sampling defaults that follow the checkpoint: schnell-style or dev-style."""

    num_inference_steps: int
    guidance_scale: float
    max_sequence_length: int


SCHNELL_DEFAULTS = FluxDefaults(num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256)
DEV_DEFAULTS = FluxDefaults(num_inference_steps=28, guidance_scale=3.5, max_sequence_length=512)


class FluxModel(TorchModel[Text2ImageInput, Text2ImageOutput]):
    """FLUX.1 (schnell or dev) on one device; the step callback makes it cancellable per step."""

    model_type = "text2image"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.pipe: Any = None
        self.defaults = SCHNELL_DEFAULTS

    def load(self) -> None:
        from diffusers import FluxPipeline
        from diffusers.utils import logging as diffusers_logging

        quiet_hf_progress()
        diffusers_logging.disable_progress_bar()
        dtype = self.place()
        source = resolve_checkpoint(self.settings)
        self.pipe = FluxPipeline.from_pretrained(source, dtype=dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        guidance = bool(getattr(self.pipe.transformer.config, "guidance_embeds", False))
        self.defaults = DEV_DEFAULTS if guidance else SCHNELL_DEFAULTS
        self.info.extra = {
            "variant": "dev" if guidance else "schnell",
            "default_steps": self.defaults.num_inference_steps,
            "default_guidance_scale": self.defaults.guidance_scale,
        }

    def infer(self, request: Text2ImageInput, ctx: JobContext) -> Text2ImageOutput:
        import torch

        seed = request.seed if request.seed is not None else secrets.randbits(63)
        steps = request.num_inference_steps or self.defaults.num_inference_steps
        guidance = (
            request.guidance_scale
            if request.guidance_scale is not None
            else self.defaults.guidance_scale
        )
        total = steps * request.count
        images = []
        ctx.raise_if_stopped()
        for index in range(request.count):

            def on_step_end(
                _pipe: Any, step: int, _timestep: Any, kwargs: dict, done: int = index * steps
            ) -> dict:
                ctx.on_progress(done + step + 1, total)
                # Raising stops the pipeline at once; setting pipe._interrupt would still run
                # the remaining loop iterations and a full-size VAE decode.
                ctx.raise_if_stopped()
                return kwargs

            # A CPU generator gives the same image for the same seed on every device type.
            generator = torch.Generator("cpu").manual_seed((seed + index) % 2**63)
            with torch.inference_mode():
                result = self.pipe(
                    prompt=request.prompt,
                    width=request.width,
                    height=request.height,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    max_sequence_length=self.defaults.max_sequence_length,
                    generator=generator,
                    callback_on_step_end=on_step_end,
                    output_type="pil",
                )
            images.append(result.images[0])
        return Text2ImageOutput(images=tuple(images), seed=seed, num_inference_steps=steps)

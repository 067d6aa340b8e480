"""FLUX text-to-image through diffusers' FluxPipeline."""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from hunyuan_service.errors import JobCancelled
from hunyuan_service.models.base import JobContext, TorchModel
from hunyuan_service.models.caches import TensorCache
from hunyuan_service.models.loading import (
    quiet_hf_progress,
    reporting_download,
    resolve_checkpoint,
)
from hunyuan_service.models.lora import Adapters, configured_adapters
from hunyuan_service.models.speed import CompiledShapes, speed_up_flux
from hunyuan_service.models.types import ImageEdit, Text2ImageInput, Text2ImageOutput


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
        self.shapes = CompiledShapes(settings.compile != "off" or settings.compile_vae)
        self.adapters: Adapters | None = None
        self.prompt_cache = TensorCache(settings.prompt_cache_bytes)
        self.edit_pipes: dict[str, Any] = {}  # image-to-image and inpainting, sharing `pipe`

    def load(self) -> None:
        from diffusers import FluxPipeline
        from diffusers.utils import logging as diffusers_logging

        quiet_hf_progress()
        diffusers_logging.disable_progress_bar()
        dtype = self.place()
        source = resolve_checkpoint(self.settings)
        # Weights are read straight onto the device, not into CPU memory first (34 GB for
        # FLUX.1-dev in bf16). Offloading wants them in CPU memory, so there they stay, and
        # quantization moves the transformer over layer by layer as it quantizes it.
        settings = self.settings
        straight = settings.offload == "none" and settings.quantize == "none"
        device_map = self.device if straight else None
        with reporting_download(source, self.report):
            pipe = FluxPipeline.from_pretrained(source, dtype=dtype, device_map=device_map)
        self.adopt(pipe)

    def adopt(self, pipe: Any) -> None:
        """Serves `pipe` (loaded, on the CPU or its device) with the configured speed options.

        `load` calls it after `from_pretrained`; the GPU benchmark calls it with a pipeline it
        built in place, so both measure the same serving code.
        """
        if self.info.device == "unloaded":
            self.place()
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        guidance = bool(getattr(pipe.transformer.config, "guidance_embeds", False))
        self.defaults = DEV_DEFAULTS if guidance else SCHNELL_DEFAULTS
        # Adapters go in before compiling: hot-swap slots must exist when the graph is traced.
        self.adapters = Adapters(
            pipe,
            configured_adapters(self.settings),
            slots=self.settings.max_loras_per_request,
            hotswap=self.settings.compile != "off",
        )
        self.adapters.load()
        speed = speed_up_flux(pipe, self.settings, self.device)
        from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

        # The same modules (so the same speed options and adapters), other denoising loops.
        # Built from the components, not `from_pipe`, which casts them and warns about it.
        for kind, edit_class in (
            ("img2img", FluxImg2ImgPipeline),
            ("inpaint", FluxInpaintPipeline),
        ):
            accepted = inspect.signature(edit_class.__init__).parameters
            parts = {k: v for k, v in pipe.components.items() if k in accepted}
            self.edit_pipes[kind] = edit_class(**parts)
            self.edit_pipes[kind].set_progress_bar_config(disable=True)
        self.info.extra = {
            "variant": "dev" if guidance else "schnell",
            "default_steps": self.defaults.num_inference_steps,
            "default_guidance_scale": self.defaults.guidance_scale,
            "loras": self.adapters.describe(),
            **speed,
        }

    def warm_up(self) -> None:
        """Runs each WARMUP size once (two steps), so compilation happens before /ready."""
        import torch

        for width, height in self.settings.warmup_sizes:
            self.shapes.note((width, height, 1), warming_up=True)
            size = Text2ImageInput(prompt="warm-up", width=width, height=height)
            steps = min(2, self.defaults.num_inference_steps)
            generator = torch.Generator("cpu").manual_seed(0)
            self._denoise("warm-up", size, steps, self.defaults.guidance_scale, generator, None)
        if self.adapters is not None:
            self.adapters.apply(())

    def _denoise(
        self,
        prompt: str | list[str],
        size: Text2ImageInput,
        steps: int,
        guidance: float,
        generator: Any,
        on_step_end: Any,
        edits: Sequence[ImageEdit] = (),
    ) -> list[Any]:
        """One pipeline call: one image per prompt, each from its own generator if a list;
        from each row's edit image (and mask) when `edits` has one per row. A batch's edits
        share their kind and strength (batch_key)."""
        import torch

        rows = len(prompt) if isinstance(prompt, list) else 1
        self.shapes.note((size.width, size.height, rows))
        if self.adapters is not None:
            self.adapters.apply(size.loras)  # every row of a batch has the same, by batch_key
        pipe = self.pipe
        extra: dict[str, Any] = {}
        if edits:
            first, one = edits[0], len(edits) == 1
            pipe = self.edit_pipes["inpaint" if first.mask is not None else "img2img"]
            extra = {
                "image": first.image if one else [edit.image for edit in edits],
                "strength": first.strength,
            }
            if first.mask is not None:
                extra["mask_image"] = first.mask if one else [edit.mask for edit in edits]
        with torch.inference_mode():
            embeds, pooled = self._embeddings(prompt, size.loras)
            result = pipe(
                **extra,
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
                width=size.width,
                height=size.height,
                num_inference_steps=steps,
                guidance_scale=guidance,
                max_sequence_length=self.defaults.max_sequence_length,
                generator=generator,
                callback_on_step_end=on_step_end,
                output_type="pt",
            )
            return to_pil(result.images)

    def _embeddings(self, prompt: str | list[str], loras: Any) -> tuple[Any, Any]:
        """The text encoders' output for each prompt, from the cache where the prompt (and any
        adapter that changes a text encoder) repeats; one row per prompt.

        Each prompt is encoded alone, hit or miss, so a hit returns exactly what its miss
        computed, and a prompt's embeddings never depend on its batch companions.
        """
        import torch

        prompts = prompt if isinstance(prompt, list) else [prompt]
        adapters = self.adapters
        text_loras = tuple(
            (name, scale)
            for name, scale in loras
            if adapters is not None and adapters.text_encoder.get(name, False)
        )
        length = self.defaults.max_sequence_length
        rows = []
        for text in prompts:
            key = (text, length, text_loras)
            found = self.prompt_cache.get(key)
            if found is None:
                found, pooled, _ids = self.pipe.encode_prompt(
                    prompt=[text], prompt_2=None, max_sequence_length=length
                )
                found = (found, pooled)
                self.prompt_cache.put(key, found)
            rows.append(found)
        if len(rows) == 1:
            return rows[0]
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])

    def caches(self) -> dict[str, Any]:
        return {"prompt_embeddings": self.prompt_cache}

    def recover_from_oom(self) -> None:
        self.prompt_cache.clear()  # it holds device memory; rebuilt as prompts come
        super().recover_from_oom()

    def _settings_of(self, request: Text2ImageInput) -> tuple[int, float]:
        steps = request.num_inference_steps or self.defaults.num_inference_steps
        guidance = (
            request.guidance_scale
            if request.guidance_scale is not None
            else self.defaults.guidance_scale
        )
        return steps, guidance

    def infer(self, request: Text2ImageInput, ctx: JobContext) -> Text2ImageOutput:
        import torch

        seed = request.seed if request.seed is not None else secrets.randbits(63)
        steps, guidance = self._settings_of(request)
        edit = request.edit
        runs = steps if edit is None else edit_steps(steps, edit.strength)  # steps that run
        # `n` images denoise together, MAX_BATCH_SIZE rows per pipeline call (an edit's image
        # and mask repeated in each row); image i uses seed + i either way.
        rows = max(1, min(request.count, self.settings.max_batch_size))
        calls = [range(i, min(i + rows, request.count)) for i in range(0, request.count, rows)]
        total = runs * len(calls)
        images = []
        ctx.raise_if_stopped()
        for number, call in enumerate(calls):

            def on_step_end(
                _pipe: Any, step: int, _timestep: Any, kwargs: dict, done: int = number * runs
            ) -> dict:
                ctx.on_progress(done + step + 1, total)
                # Raising stops the pipeline at once; setting pipe._interrupt would still run
                # the remaining loop iterations and a full-size VAE decode.
                ctx.raise_if_stopped()
                return kwargs

            # A CPU generator gives the same image for the same seed on every device type.
            generators = [torch.Generator("cpu").manual_seed((seed + i) % 2**63) for i in call]
            prompt: str | list[str] = request.prompt
            generator: Any = generators[0]
            if len(call) > 1:
                prompt, generator = [request.prompt] * len(call), generators
            edits = () if edit is None else (edit,) * len(call)
            made = self._denoise(prompt, request, steps, guidance, generator, on_step_end, edits)
            if edit is not None and edit.mask is not None:
                made = [composite(image, edit.image, edit.mask) for image in made]
            images += made
        return Text2ImageOutput(images=tuple(images), seed=seed, num_inference_steps=steps)

    # -- batching ----------------------------------------------------------------------------

    supports_batching = True

    def batch_key(self, request: Text2ImageInput) -> Hashable | None:
        """Jobs of the same size, steps, guidance and LoRA adapters denoise together, an edit
        with edits of its kind (image-to-image or inpainting) and strength; `n > 1` runs alone
        (its own images make its rows)."""
        if request.count != 1:
            return None
        steps, guidance = self._settings_of(request)
        edit = request.edit
        kind = None if edit is None else (edit.mask is not None, edit.strength)
        return (request.width, request.height, steps, guidance, request.loras, kind)

    def infer_batch(
        self, requests: list[Text2ImageInput], contexts: list[JobContext]
    ) -> list[Text2ImageOutput | BaseException]:
        """One pipeline call for all rows, each with its own seed's generator.

        A row's latents come from its own generator, exactly as when it runs alone, so its image
        matches its solo image up to floating-point noise. A row whose job stops keeps being
        computed (the pipeline cannot drop a row mid-run) but its result is discarded; the call
        stops at the next step once every row has stopped.
        """
        import torch

        if all(ctx.should_stop() for ctx in contexts):
            raise JobCancelled("every row of the batch stopped")
        first = requests[0]
        steps, guidance = self._settings_of(first)
        seeds = [r.seed if r.seed is not None else secrets.randbits(63) for r in requests]
        # All rows edit, or none, with one strength (batch_key)
        edits = [r.edit for r in requests if r.edit is not None]
        runs = edit_steps(steps, edits[0].strength) if edits else steps

        def on_step_end(_pipe: Any, step: int, _timestep: Any, kwargs: dict) -> dict:
            live = [ctx for ctx in contexts if not ctx.should_stop()]
            for ctx in live:
                ctx.on_progress(step + 1, runs)
            if not live:
                raise JobCancelled("every row of the batch stopped")
            return kwargs

        generators = [torch.Generator("cpu").manual_seed(seed % 2**63) for seed in seeds]
        prompts = [r.prompt for r in requests]
        images = self._denoise(prompts, first, steps, guidance, generators, on_step_end, edits)
        if edits and edits[0].mask is not None:
            images = [
                composite(image, edit.image, edit.mask)
                for image, edit in zip(images, edits, strict=True)
            ]
        outputs: list[Text2ImageOutput | BaseException] = []
        for ctx, seed, image in zip(contexts, seeds, images, strict=True):
            if ctx.should_stop():
                outputs.append(JobCancelled(f"job stopped: {ctx.stop_reason()}"))
            else:
                outputs.append(
                    Text2ImageOutput(images=(image,), seed=seed, num_inference_steps=steps)
                )
        return outputs


def edit_steps(steps: int, strength: float) -> int:
    """The denoising steps an edit runs, as diffusers' image-to-image pipelines count them: the
    last `steps * strength` of the schedule (at least one for any strength above 0)."""
    start = int(max(steps - min(steps * strength, steps), 0))
    return steps - start


def to_pil(images: Any) -> list[Any]:
    """The pipeline's images (B x 3 x H x W in [0, 1], on the device) as 8-bit PIL images, the
    pixels diffusers' `output_type="pil"` gives, bit for bit: scaled by 255 in float32 and
    rounded half to even. Done on the device, so only the 8-bit pixels cross to the host (a
    quarter of float32's bytes) and the model thread does no per-pixel work on the CPU."""
    import torch
    from PIL import Image

    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return [Image.fromarray(image) for image in pixels.cpu().numpy()]


def composite(generated: Any, source: Any, mask: Any) -> Any:
    """The inpainted image with every pixel outside the mask as sent: white takes the new
    pixels, black keeps the input's, grey blends them."""
    from PIL import Image

    return Image.composite(generated, source, mask)

"""text2image requests: an /infer-style JSON body becomes a FLUX input and a result renderer."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from hunyuan_service.api.body import (
    is_multipart,
    negotiate,
    parse_json,
    read_body,
    wants_event_stream,
)
from hunyuan_service.api.encoding import base64_json_string, encode_image, json_object
from hunyuan_service.api.headers import header
from hunyuan_service.api.image2text import decode_images
from hunyuan_service.api.openai_schemas import ImageGenerationRequest
from hunyuan_service.api.renderers import Prepared, Rendered
from hunyuan_service.api.schemas import Text2ImageRequest, WebhookField
from hunyuan_service.engine.engine import Engine, JobHandle
from hunyuan_service.errors import InvalidInput, NotAcceptable, UnsupportedMediaType
from hunyuan_service.media import ImageSource
from hunyuan_service.models.lora import canonical
from hunyuan_service.models.types import ImageEdit, Text2ImageInput, Text2ImageOutput
from hunyuan_service.settings import Settings

# Defaults of `strength`: image-to-image keeps the input's layout; inpainting repaints fully.
IMG2IMG_STRENGTH = 0.6
INPAINT_STRENGTH = 1.0


async def prepare_text2image(
    request: Request, engine: Engine, schema: type[Text2ImageRequest] = Text2ImageRequest
) -> Prepared:
    engine.check_ready()  # refuse at once while starting or draining, before reading the body
    # Any non-multipart body is read as JSON: curl's `-d` sends a form content type by default.
    if is_multipart(request):
        raise UnsupportedMediaType("text2image takes a JSON body, not multipart/form-data")
    body = await read_body(request, engine)
    params: Text2ImageRequest = await parse_json(body, schema, engine)
    stream = wants_event_stream(request, params.stream)
    fmt = params.output_format
    raw_format = negotiate(header(request, b"accept"), fmt)
    if params.n > 1 and raw_format is not None and not stream:  # refused before any decoding
        raise NotAcceptable(
            f"n: {params.n} images come back as JSON, one image_base64 each; ask for "
            "application/json, or n=1 for the raw image",
            param="n",
        )
    size = (params.width, params.height)
    sized = bool({"width", "height"} & params.model_fields_set)
    edit, reservation = None, None
    if params.image is not None:
        reservation = engine.reserve()  # held before decoding, as for image2text's images
        try:
            sources = [ImageSource(params.image, "image")]
            if params.mask is not None:
                sources.append(ImageSource(params.mask, "mask", mask=True))
            edit, size = await prepare_edit(
                engine, sources, size if sized else None, params.strength, request, params.timeout_s
            )
        except BaseException:
            reservation.release()
            raise
    payload = to_model_input(params, size, edit)

    async def render(output: Text2ImageOutput, handle: JobHandle) -> Rendered:
        width, height = output.image.size
        fields = {
            "format": fmt,
            "width": width,
            "height": height,
            "seed": output.seed,
            "timings": handle.timings(),
        }
        body, raw = await engine.run_cpu(image_json, output.images, fmt, fields)
        return Rendered(body, raw, fmt)

    return Prepared(
        payload,
        render,
        timeout_s=params.timeout_s,
        stream=stream,
        raw_format=None if stream else raw_format,
        reservation=reservation,
        webhook=params.webhook if isinstance(params, WebhookField) else None,
    )


def to_model_input(
    params: Text2ImageRequest | ImageGenerationRequest,
    size: tuple[int, int],
    edit: ImageEdit | None = None,
) -> Text2ImageInput:
    """FLUX's input from a request's fields (an /infer body, or OpenAI's images.generate or
    images.edit): prompt, steps, guidance, seed, LoRAs and `n`, at `size` (width, height)."""
    return Text2ImageInput(
        prompt=params.prompt,
        width=size[0],
        height=size[1],
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        seed=params.seed,
        loras=canonical((choice.name, choice.scale) for choice in params.loras),
        count=params.n,
        edit=edit,
    )


async def prepare_edit(
    engine: Engine,
    sources: list[ImageSource],
    size: tuple[int, int] | None,
    strength: float | None,
    request: Request | None = None,
    timeout_s: float | None = None,
) -> tuple[ImageEdit, tuple[int, int]]:
    """Decodes an edit's image (and mask) on the CPU pool, under the request's deadline and
    disconnect, and fits them to the output `size` (None: the image's own, see `fitted_size`)."""
    settings = engine.settings
    budget = settings.max_image_side**2
    images = await decode_images(engine, sources, request, timeout_s, budget, max_count=2)
    return await engine.run_cpu(fit_edit, images, size, strength, settings)


def fit_edit(
    images: list[Any], size: tuple[int, int] | None, strength: float | None, settings: Settings
) -> tuple[ImageEdit, tuple[int, int]]:
    """The edit at the output size: the image, and the mask (which must match it), resized to
    `size` when it differs from theirs."""
    from PIL import Image

    image, mask = images[0], (images[1] if len(images) > 1 else None)
    if mask is not None and mask.size != image.size:
        raise InvalidInput(
            f"mask: is {mask.width}x{mask.height} pixels; it must be the image's size, "
            f"{image.width}x{image.height}",
            param="mask",
        )
    if size is None:
        size = fitted_size(image.size, settings)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC)
        if mask is not None:
            mask = mask.resize(size, Image.Resampling.BILINEAR)
    if strength is None:
        strength = INPAINT_STRENGTH if mask is not None else IMG2IMG_STRENGTH
    return ImageEdit(image=image, strength=strength, mask=mask), size


def fitted_size(size: tuple[int, int], settings: Settings) -> tuple[int, int]:
    """An input image's size as an output size: within MAX_IMAGE_SIDE, each side rounded down
    to a multiple of 16; a 422 naming `image` when that falls below MIN_IMAGE_SIDE."""
    width, height = size
    scale = min(1.0, settings.max_image_side / max(width, height))
    fitted = (int(width * scale) // 16 * 16, int(height * scale) // 16 * 16)
    if min(fitted) < settings.min_image_side:
        raise InvalidInput(
            f"image: is {width}x{height} pixels, too small an output at multiples of 16 (each "
            f"side at least {settings.min_image_side}); send a larger image, or width and height",
            param="image",
        )
    return fitted


def image_json(
    images: tuple[Any, ...], fmt: str, fields: dict[str, Any]
) -> tuple[bytes, bytes | None]:
    """Encodes each image once and builds the whole JSON body around them, in one CPU-pool
    call. The first image is `image_base64`; with several, `images` lists each with its seed
    (`fields["seed"]` + i), and there is no single raw image."""
    encoded = [encode_image(image, fmt) for image in images]
    raw = {"image_base64": base64_json_string(encoded[0])}
    if len(encoded) > 1:
        items = [
            json_object(
                {"seed": (fields["seed"] + i) % 2**63}, {"image_base64": base64_json_string(data)}
            )
            for i, data in enumerate(encoded)
        ]
        raw["images"] = b"[" + b",".join(items) + b"]"
        return json_object(fields, raw), None
    return json_object(fields, raw), encoded[0]

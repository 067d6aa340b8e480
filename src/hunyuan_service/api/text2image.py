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
from hunyuan_service.api.renderers import Prepared, Rendered
from hunyuan_service.api.schemas import Text2ImageRequest, WebhookField
from hunyuan_service.engine.engine import Engine, JobHandle
from hunyuan_service.errors import UnsupportedMediaType
from hunyuan_service.models.lora import canonical
from hunyuan_service.models.types import Text2ImageInput, Text2ImageOutput


async def prepare_text2image(
    request: Request, engine: Engine, schema: type[Text2ImageRequest] = Text2ImageRequest
) -> Prepared:
    engine.check_ready()  # refuse at once while starting or draining, before reading the body
    # Any non-multipart body is read as JSON: curl's `-d` sends a form content type by default.
    if is_multipart(request):
        raise UnsupportedMediaType("text2image takes a JSON body, not multipart/form-data")
    body = await read_body(request, engine.settings.max_body_bytes, engine.settings.body_timeout_s)
    params: Text2ImageRequest = await parse_json(body, schema, engine)
    payload = Text2ImageInput(
        prompt=params.prompt,
        width=params.width,
        height=params.height,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        seed=params.seed,
        loras=canonical((choice.name, choice.scale) for choice in params.loras),
    )
    stream = wants_event_stream(request, params.stream)
    fmt = params.output_format
    raw_format = negotiate(request.headers.get("accept", ""), fmt)

    async def render(output: Text2ImageOutput, handle: JobHandle) -> Rendered:
        width, height = output.image.size
        fields = {
            "format": fmt,
            "width": width,
            "height": height,
            "seed": output.seed,
            "timings": handle.timings(),
        }
        body, raw = await engine.run_cpu(image_json, output.image, fmt, fields)
        return Rendered(body, raw, fmt)

    return Prepared(
        payload,
        render,
        timeout_s=params.timeout_s,
        stream=stream,
        raw_format=None if stream else raw_format,
        webhook=params.webhook if isinstance(params, WebhookField) else None,
    )


def image_json(image: Any, fmt: str, fields: dict[str, Any]) -> tuple[bytes, bytes]:
    """Encodes the image once and builds the whole JSON body around it, in one CPU-pool call."""
    data = encode_image(image, fmt)
    return json_object(fields, {"image_base64": base64_json_string(data)}), data

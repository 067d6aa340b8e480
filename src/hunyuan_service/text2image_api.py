"""/infer for text2image: validate, queue, then answer with JSON, raw image bytes or SSE."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response

from hunyuan_service.errors import UnsupportedMediaType
from hunyuan_service.http_io import (
    is_multipart,
    json_object,
    parse_json,
    read_body,
    requested_image_type,
    scheduler_for,
    server_timing,
    wait_for_disconnect,
    wants_event_stream,
)
from hunyuan_service.imageio import MEDIA_TYPES, base64_json_string, encode_image
from hunyuan_service.jobs import Job
from hunyuan_service.models.flux import Text2ImageInput, Text2ImageOutput
from hunyuan_service.schemas import Text2ImageRequest
from hunyuan_service.service import Service, request_id_of
from hunyuan_service.streaming import submit_and_respond


async def infer_text2image(request: Request, service: Service) -> Response:
    scheduler_for(service)  # refuse at once while starting or draining, before reading the body
    # Any non-multipart body is read as JSON: curl's `-d` sends a form content type by default.
    if is_multipart(request):
        raise UnsupportedMediaType("text2image takes a JSON body, not multipart/form-data")
    body = await read_body(request, service.settings.max_body_bytes)
    params: Text2ImageRequest = await parse_json(body, Text2ImageRequest, service)
    payload = Text2ImageInput(
        prompt=params.prompt,
        width=params.width,
        height=params.height,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        seed=params.seed,
    )
    stream = wants_event_stream(request, params.stream)
    raw_format = None if stream else requested_image_type(request.headers.get("accept", ""))
    if raw_format is not None:
        return await _raw_image(request, service, payload, params.timeout_s, raw_format)

    async def render(output: Text2ImageOutput, job: Job) -> bytes:
        width, height = output.image.size
        fields = {
            "format": params.output_format,
            "width": width,
            "height": height,
            "seed": output.seed,
            "timings": job.timings(),
        }
        return await service.run_cpu(image_json, output.image, params.output_format, fields)

    return await submit_and_respond(
        request, service, payload, timeout_s=params.timeout_s, stream=stream, render=render
    )


def image_json(image: Any, fmt: str, fields: dict[str, Any]) -> bytes:
    """Encodes the image and builds the whole body in one CPU-pool call."""
    return json_object(fields, {"image_base64": base64_json_string(image, fmt)})


async def _raw_image(
    request: Request, service: Service, payload: Text2ImageInput, timeout_s: float | None, fmt: str
) -> Response:
    """`Accept: image/png` (or jpeg, webp): the body is the image itself, the seed a header."""
    scheduler = scheduler_for(service)
    job = scheduler.submit(payload, request_id_of(request), timeout_s=timeout_s)
    output = await scheduler.wait(job, wait_for_disconnect(request))
    data = await service.run_cpu(encode_image, output.image, fmt)
    headers = {"X-Seed": str(output.seed), "Server-Timing": server_timing(job.timings())}
    return Response(data, media_type=MEDIA_TYPES[fmt], headers=headers)

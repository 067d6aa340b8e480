"""Small HTTP helpers shared by the route modules: bounded body reads, parsing, negotiation."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from hunyuan_service.errors import BadRequest, InvalidInput, PayloadTooLarge, Unavailable
from hunyuan_service.imageio import MEDIA_TYPES
from hunyuan_service.schemas import describe_validation_errors
from hunyuan_service.service import Phase, Service
from hunyuan_service.worker import Scheduler


async def read_body(request: Request, limit: int) -> bytes:
    """Reads the body, refusing it with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; at most {limit} are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over {limit} bytes, the most accepted")
        chunks.append(chunk)
    return b"".join(chunks)


# Bodies above this size are parsed on the CPU pool: a 20 MB base64 image takes tens of
# milliseconds to parse, which would stall every other connection on the event loop.
INLINE_PARSE_BYTES = 256 * 1024


async def parse_json(
    body: bytes, schema: type[BaseModel], service: Service, *, status_400: bool = False
) -> Any:
    """Validates a JSON body against `schema` and the operator's limits; the error names the field.

    /infer answers 422 like FastAPI does; the OpenAI-compatible routes answer 400 like OpenAI.
    """
    if len(body) > INLINE_PARSE_BYTES:
        return await service.run_cpu(_parse_json, body, schema, service, status_400)
    return _parse_json(body, schema, service, status_400)


def _parse_json(body: bytes, schema: type[BaseModel], service: Service, status_400: bool) -> Any:
    try:
        return schema.model_validate_json(body or b"{}", context={"settings": service.settings})
    except ValidationError as error:
        message, param = describe_validation_errors(list(error.errors()))
        raise (BadRequest if status_400 else InvalidInput)(message, param=param) from None


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away. Only valid once the body has been read."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def wants_event_stream(request: Request, stream_field: bool) -> bool:
    return stream_field or "text/event-stream" in request.headers.get("accept", "").lower()


def requested_image_type(accept: str) -> str | None:
    """The image format an `Accept: image/...` header asks for, or None for JSON."""
    for part in accept.split(","):
        media_type = part.split(";", 1)[0].strip().lower()
        for fmt, known in MEDIA_TYPES.items():
            if media_type == known:
                return fmt
    return None


def scheduler_for(service: Service) -> Scheduler:
    if service.scheduler is None or service.phase is not Phase.READY:
        raise Unavailable(f"the service is {service.phase.value}; retry shortly", retry_after_s=1)
    return service.scheduler


def json_bytes(body: Any) -> bytes:
    """JSON as Starlette's JSONResponse writes it."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def json_object(fields: dict[str, Any], raw: dict[str, bytes]) -> bytes:
    """A JSON object whose `raw` values are already JSON text, spliced in as bytes.

    For images in base64: `json.dumps` over a multi-megabyte string takes ~17 ms and holds the
    GIL throughout, so it stalls the event loop even when run on another thread.
    """
    parts = [json_bytes(key) + b":" + value for key, value in raw.items()]
    parts += [json_bytes(key) + b":" + json_bytes(value) for key, value in fields.items()]
    return b"{" + b",".join(parts) + b"}"


def server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{name.removesuffix('_ms')};dur={value}" for name, value in timings.items())

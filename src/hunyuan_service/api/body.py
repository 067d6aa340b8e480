"""Request bodies and negotiation: bounded reads, validated parsing, Accept, client disconnects."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from hunyuan_service.api.encoding import MEDIA_TYPES
from hunyuan_service.api.schemas import describe_validation_errors
from hunyuan_service.engine.engine import Engine
from hunyuan_service.errors import BadRequest, InvalidInput, PayloadTooLarge


async def read_body(request: Request, limit: int) -> bytes:
    """Reads the body, refusing it with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; at most {limit} are accepted")
    # The ASGI messages are read directly: `request.stream()` costs an async generator per
    # request, and a small body arrives whole in the first message anyway.
    chunks, size = [], 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over {limit} bytes, the most accepted")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# Bodies above this size are parsed on the CPU pool: a 20 MB base64 image takes tens of
# milliseconds to parse, which would stall every other connection on the event loop.
INLINE_PARSE_BYTES = 256 * 1024


async def parse_json(
    body: bytes, schema: type[BaseModel], engine: Engine, *, status_400: bool = False
) -> Any:
    """Validates a JSON body against `schema` and the operator's limits; the error names the field.

    /infer answers 422 like FastAPI does; the OpenAI-compatible routes answer 400 like OpenAI.
    """
    if len(body) > INLINE_PARSE_BYTES:
        return await engine.run_cpu(_parse_json, body, schema, engine, status_400)
    return _parse_json(body, schema, engine, status_400)


def _parse_json(body: bytes, schema: type[BaseModel], engine: Engine, status_400: bool) -> Any:
    try:
        return schema.model_validate_json(body or b"{}", context={"settings": engine.settings})
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

"""Request bodies and negotiation: bounded reads, validated parsing, Accept, client disconnects."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Mapping
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive

from hunyuan_service.api.encoding import MEDIA_TYPES
from hunyuan_service.api.headers import header
from hunyuan_service.api.schemas import describe_validation_errors
from hunyuan_service.engine.alarms import Alarms
from hunyuan_service.engine.engine import Engine
from hunyuan_service.errors import (
    BadRequest,
    BodyTimeout,
    InvalidInput,
    NotAcceptable,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from hunyuan_service.media import ImageSource

ModelT = TypeVar("ModelT", bound=BaseModel)


async def read_body(request: Request, engine: Engine) -> bytes:
    """Reads the body, refusing it with 413 as soon as it passes MAX_BODY_BYTES, and with 408
    if it has not all arrived within BODY_TIMEOUT_S (a client trickling a body holds memory)."""
    limit = engine.settings.max_body_bytes
    refuse_by_headers(request, limit)
    # The ASGI messages are read directly: `request.stream()` costs an async generator per
    # request, and a small body arrives whole in the first message anyway.
    chunks, size = [], 0
    with BodyDeadline(engine.alarms, engine.settings.body_timeout_s):
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


def refuse_by_headers(request: Request, limit: int) -> None:
    """What the headers alone refuse, before any of the body is read: a declared length over
    `limit` (413), and a compressed body (415: it would otherwise fail as bad JSON or a bad
    form, which misleads)."""
    declared = header(request, b"content-length")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; at most {limit} are accepted")
    encoding = header(request, b"content-encoding")
    if encoding.strip().lower() not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding: {encoding[:40]} is not accepted; send the body uncompressed"
        )


class BodyDeadline:
    """Turns the block into a 408 once `timeout_s` has passed (up to one alarm tick later).

    The alarm cancels the reading task, and that cancellation is turned into `BodyTimeout`
    here, so no other cancellation is mistaken for it.
    """

    __slots__ = ("alarms", "expired", "key", "task", "timeout_s")

    def __init__(self, alarms: Alarms, timeout_s: float) -> None:
        self.alarms, self.timeout_s = alarms, timeout_s
        self.task: asyncio.Task[Any] | None = None
        self.key: int | None = None
        self.expired = False

    def __enter__(self) -> None:
        self.task = asyncio.current_task()
        if self.task is not None:
            self.key = self.alarms.arm(self.timeout_s, self._expire)

    def _expire(self) -> None:
        self.expired = True
        if self.task is not None:
            self.task.cancel()

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if self.key is not None:
            self.alarms.disarm(self.key)
        if kind is not None and issubclass(kind, asyncio.CancelledError) and self.expired:
            uncancel = getattr(self.task, "uncancel", None)  # Python 3.11+
            if uncancel is not None:
                uncancel()  # the task itself is not cancelled, only this read
            raise BodyTimeout(
                f"the body did not arrive within {self.timeout_s:g} s (BODY_TIMEOUT_S)"
            ) from None


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


# Keys and list items a JSON body may hold, beyond twice MAX_PROMPT_CHARS (text may contain
# ':' and ','). The largest legitimate structures (256 chat messages of 64 parts each, a 64 KiB
# response_format schema, 256 images) stay well under it.
STRUCTURE_ALLOWANCE = 150_000


def _parse_json(body: bytes, schema: type[BaseModel], engine: Engine, status_400: bool) -> Any:
    # Counted before parsing: building a dict of 400,000 keys takes a third of a second with the
    # GIL held, which stalls every other request; counting two bytes takes milliseconds.
    members = body.count(b":") + body.count(b",")
    limit = 2 * engine.settings.max_prompt_chars + STRUCTURE_ALLOWANCE
    if members > limit:
        raise (BadRequest if status_400 else InvalidInput)(
            f"body: has about {members} JSON keys and list items; a request has at most {limit}",
            param="body",
        )
    try:
        # Strict: in JSON, `width: true`, `seed: false` or `stream: "yes"` is surely a mistake,
        # not a value to coerce. (Multipart fields are text, and are validated laxly.)
        return schema.model_validate_json(
            body or b"{}", strict=True, context={"settings": engine.settings}
        )
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
    return header(request, b"content-type").lower().startswith("multipart/form-data")


@functools.lru_cache(maxsize=256)
def accepted_types(accept: str) -> tuple[str, ...]:
    """The media types an Accept header allows, best first; `q=0` means "not this one".

    Cached: clients send the same few headers on every request (a few microseconds each)."""
    ranked = []
    for position, part in enumerate(accept.lower().split(",")):
        media_type, *parameters = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media_type and quality > 0:
            ranked.append((-quality, position, media_type))
    return tuple(media_type for _, _, media_type in sorted(ranked))


def wants_event_stream(request: Request, stream_field: bool) -> bool:
    return stream_field or "text/event-stream" in accepted_types(header(request, b"accept"))


def requested_image_type(accept: str) -> str | None:
    """The image format an `Accept: image/...` header asks for, or None for JSON."""
    for media_type in accepted_types(accept):
        for fmt, known in MEDIA_TYPES.items():
            if media_type == known:
                return fmt
    return None


def negotiate(accept: str, image_format: str | None) -> str | None:
    """What /infer answers with: an image format for raw bytes, or None for JSON (or SSE).

    `image_format` is the request's `output_format` (None where the answer is text). An explicit
    image type wins over it; `image/*` takes it. Raises `NotAcceptable` (406) when the header
    allows nothing the endpoint can send.
    """
    images = image_format is not None
    if not accept.strip():
        return None
    allowed = accepted_types(accept)
    json_types = {"application/json", "application/*", "*/*", "text/event-stream"}
    for media_type in allowed:
        if images and media_type in MEDIA_TYPES.values():
            return next(fmt for fmt, known in MEDIA_TYPES.items() if known == media_type)
        if images and media_type == "image/*":
            return image_format
        if media_type in json_types:
            return None
    offered = ["application/json", "text/event-stream"]
    if images:
        offered += list(MEDIA_TYPES.values())
    raise NotAcceptable(
        f"cannot answer with any of Accept: {accept.strip()!r}; this endpoint sends "
        + ", ".join(offered)
    )


# -- multipart/form-data --------------------------------------------------------------------

# The form keys of image2text's uploads by the field they fill: curl's `-F images=@a.png` or
# `-F videos=@clip.mp4`, and the `image` / `image[]` spelling of OpenAI's SDK.
MEDIA_FIELDS = {
    "images": "images",
    "image": "images",
    "images[]": "images",
    "videos": "videos",
    "videos[]": "videos",
}


async def read_multipart(
    request: Request,
    engine: Engine,
    schema: type[ModelT],
    file_fields: Mapping[str, str],
    max_files: int,
) -> tuple[ModelT, dict[str, list[ImageSource]]]:
    """Parses a form whose file (or string) parts named in `file_fields` are images, and whose
    other parts are the schema's fields; the body cap holds for chunked uploads too.

    Returns the validated fields and the image sources by the field they fill, each one named
    for error messages as `field[i]`.
    """
    settings = engine.settings
    refuse_by_headers(request, settings.max_body_bytes)
    limited = Request(
        request.scope, receive=_capped_receive(request.receive, settings.max_body_bytes)
    )
    try:
        with BodyDeadline(engine.alarms, settings.body_timeout_s):
            form = await limited.form(
                max_files=max_files,
                max_fields=64,
                max_part_size=max(settings.max_prompt_chars * 4, settings.max_image_bytes * 2),
            )
    except StarletteHTTPException as error:  # Starlette's 400s for its limits: a 422, as in JSON
        detail = str(error.detail)
        first = next(iter(file_fields.values()))
        if "Too many files" in detail:
            raise InvalidInput(
                f"more than {max_files} images sent; at most {max_files} are allowed",
                param=first,
            ) from None
        if "Too many fields" in detail:
            raise InvalidInput("more than 64 form fields sent", param="body") from None
        raise
    try:
        fields: dict[str, Any] = {}
        files: dict[str, list[ImageSource]] = {}
        for key, value in form.multi_items():
            if key in file_fields:
                field = file_fields[key]
                found = files.setdefault(field, [])
                param = f"{field}[{len(found)}]"
                if isinstance(value, UploadFile):
                    cap = (
                        settings.max_video_bytes if field == "videos" else settings.max_image_bytes
                    )
                    data = await value.read(cap + 1)  # one byte over: refused by its cap
                    found.append(ImageSource(data, param))
                else:
                    found.append(ImageSource(value, param))
            elif isinstance(value, UploadFile):
                names = " or ".join(repr(name) for name in dict.fromkeys(file_fields.values()))
                raise InvalidInput(f"{key}: unexpected file; upload images as {names}", param=key)
            elif key in fields:  # which of two values was meant is not ours to guess
                raise InvalidInput(f"{key}: sent twice; send each field once", param=key)
            elif key == "loras" or (key == "response_format" and value.lstrip()[:1] == "{"):
                fields[key] = _json_field(key, value)  # a list or object, sent as JSON text
            else:
                fields[key] = value
        try:
            params = schema.model_validate(fields, context={"settings": settings})
        except ValidationError as error:
            message, bad_field = describe_validation_errors(list(error.errors()))
            raise InvalidInput(message, param=bad_field) from None
        count = sum(len(found) for found in files.values())
        if count > max_files:
            raise InvalidInput(
                f"{count} images sent; at most {max_files} are allowed",
                param=next(iter(files)),
            )
        return params, files
    finally:
        await form.close()


def _json_field(key: str, value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        raise InvalidInput(f"{key}: must be JSON text in a form field", param=key) from None


def _capped_receive(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLarge(f"the body is over {limit} bytes, the most accepted")
        return message

    return capped

"""image2text requests: JSON or multipart bodies, safe image intake, and the text renderer."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect

from hunyuan_service.api.body import (
    MEDIA_FIELDS,
    is_multipart,
    negotiate,
    parse_json,
    read_body,
    read_multipart,
    wait_for_disconnect,
    wants_event_stream,
)
from hunyuan_service.api.encoding import json_bytes
from hunyuan_service.api.headers import header
from hunyuan_service.api.renderers import Prepared, Rendered
from hunyuan_service.api.schemas import (
    Image2TextRequest,
    ResponseFormat,
    WebhookField,
    video_sampling,
)
from hunyuan_service.engine.engine import Engine, JobHandle
from hunyuan_service.errors import DeadlineExceeded
from hunyuan_service.media import ImageSource, load_images
from hunyuan_service.models.grammar import compile_response_format
from hunyuan_service.models.types import (
    ChatMessage,
    Image2TextInput,
    Image2TextOutput,
    OutputGrammar,
    PixelRange,
)

# Qwen's image resize (qwen-vl-utils' smart_resize) refuses an image whose longer side is more
# than this many times its shorter one; intake refuses it first, with its parameter's name.
MAX_ASPECT_RATIO = 200


async def prepare_image2text(
    request: Request, engine: Engine, schema: type[Image2TextRequest] = Image2TextRequest
) -> Prepared:
    """Validates the body, holds a queue place, then decodes the images off the event loop.

    The place is held before decoding, so a request that cannot be served costs no decoding; the
    returned `Prepared` carries it to `Engine.submit`. A text-only request needs no place held.
    """
    engine.check_ready()
    negotiate(header(request, b"accept"), None)  # text: JSON or SSE only, else a 406
    settings = engine.settings
    if is_multipart(request):
        params, files = await read_multipart(
            request, engine, schema, MEDIA_FIELDS, settings.max_input_images
        )
        # Uploads take the request's bounds; a JSON item may carry its own.
        pixels = params.pixels()
        sampling = video_sampling(params.fps, params.max_frames, *pixels, settings)
        sources = [replace(s, pixels=pixels) for s in files.get("images", [])]
        video_sources = [replace(s, video=sampling) for s in files.get("videos", [])]
    else:
        body = await read_body(request, engine)
        params = await parse_json(body, schema, engine)
        sources, video_sources = params.image_sources(), params.video_sources(settings)
    sources += video_sources
    grammar = await compile_grammar(engine, params.response_format)
    reservation, media = None, []
    if sources:
        reservation = engine.reserve()
        try:
            media = await decode_images(
                engine, sources, request, params.timeout_s, max_ratio=MAX_ASPECT_RATIO
            )
        except BaseException:
            reservation.release()
            raise
    split = len(sources) - len(video_sources)  # the videos come last
    images, videos = media[:split], media[split:]
    own = tuple(source.pixels for source in sources[:split])
    return Prepared(
        to_model_input(params, images, grammar, videos, own),
        render_text,
        timeout_s=params.timeout_s,
        stream=wants_event_stream(request, params.stream),
        reservation=reservation,
        webhook=params.webhook if isinstance(params, WebhookField) else None,
    )


async def compile_grammar(
    engine: Engine, response_format: ResponseFormat | None
) -> OutputGrammar | None:
    """The grammar a `response_format` asks for, compiled on the CPU pool (cached per schema);
    an unsupported schema is a 400 that names the problem."""
    if response_format is None or not response_format.constrains:
        return None
    spec = response_format.json_schema
    schema, name = (None, "") if spec is None else (spec.schema_, spec.name)
    return await engine.run_cpu(compile_response_format, response_format.type, schema, name)


async def decode_images(
    engine: Engine,
    sources: list[ImageSource],
    request: Request | None = None,
    timeout_s: float | None = None,
    max_pixels: int | None = None,
    max_count: int | None = None,
    max_ratio: int | None = None,
) -> list[Any]:
    """Fetches and decodes client images on the CPU pool (`load_images`, whose limits the
    arguments are), each shaped there by the model's `prepare_image`; a text-only request
    skips the hop.

    The request's deadline and its client's disconnect apply here too: the request is answered
    (504) or dropped at once, and the pool thread stops before its next image. The image it is
    decoding then finishes in the background; its cost is bounded up front (bytes, pixels,
    JPEG scans), and /health reports a pool task that runs far too long.
    """
    if not sources:
        return []
    stop = threading.Event()
    model = engine.model
    decoding = asyncio.ensure_future(
        engine.run_cpu(
            load_images,
            sources,
            engine.settings,
            stop,
            max_pixels,
            max_count,
            max_ratio,
            None if model is None else model.prepare_image,
        )
    )
    waiters: set[asyncio.Future[Any]] = {decoding}
    left = None
    if request is not None:
        left = asyncio.ensure_future(wait_for_disconnect(request))
        waiters.add(left)
    deadline = timeout_s or engine.settings.request_timeout_s
    try:
        done, _ = await asyncio.wait(waiters, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if left is not None:
            left.cancel()
    if left is not None and left in done:  # first: its disconnect message is now consumed
        stop.set()
        decoding.add_done_callback(_forget)
        raise ClientDisconnect()
    if decoding in done:
        return decoding.result()
    stop.set()
    decoding.add_done_callback(_forget)
    raise DeadlineExceeded(
        f"the images were not decoded within the request's deadline ({deadline:g} s); send "
        "smaller images or allow more time"
    )


def _forget(future: asyncio.Future[Any]) -> None:
    """Collects an abandoned decode's outcome, so it is never reported as unretrieved."""
    if not future.cancelled():
        future.exception()


async def render_text(output: Image2TextOutput, handle: JobHandle) -> Rendered:
    # A text answer is small enough to serialise on the loop; a thread hop would cost more.
    body = {
        "text": output.text,
        "finish_reason": output.finish_reason,
        "usage": usage(output),
        "timings": handle.timings(),
    }
    return Rendered(json_bytes(body))


def usage(output: Image2TextOutput) -> dict[str, int]:
    return {
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "total_tokens": output.prompt_tokens + output.completion_tokens,
    }


def to_model_input(
    params: Image2TextRequest,
    images: list[Any],
    grammar: OutputGrammar | None = None,
    videos: list[Any] | None = None,
    image_pixels: tuple[PixelRange, ...] = (),
) -> Image2TextInput:
    """The model's input for an /infer or jobs body; `image_pixels`: each image's own bounds."""
    message = ChatMessage("user", params.prompt, tuple(images), tuple(videos or ()), image_pixels)
    return Image2TextInput(
        messages=(message,),
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty,
        seed=params.seed,
        grammar=grammar,
        min_pixels=params.min_pixels,
        max_pixels=params.max_pixels,
    )

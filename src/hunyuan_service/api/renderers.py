"""Wire formats over one `JobHandle`: a JSON body, raw image bytes, or Server-Sent Events.

A route turns its body into a `Prepared` request, submits it through the engine, and picks a
renderer here. Renderers only read the handle's events and outcome; none touches the queue.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from hunyuan_service.api.body import wait_for_disconnect
from hunyuan_service.api.deps import request_id_of
from hunyuan_service.api.encoding import MEDIA_TYPES, encode_image, json_bytes, server_timing
from hunyuan_service.engine.engine import Engine, JobHandle, Reservation
from hunyuan_service.engine.events import Failed, Heartbeat, Succeeded
from hunyuan_service.engine.jobs import StopReason
from hunyuan_service.errors import error_body


@dataclass(frozen=True)
class Rendered:
    """A successful result as /infer returns it (`body`, JSON), plus the raw image if any."""

    body: bytes
    raw: bytes | None = None
    raw_format: str | None = None


Render = Callable[[Any, JobHandle], Awaitable[Rendered]]


@dataclass
class Prepared:
    """An /infer-style request, validated and turned into the model's input, ready to submit."""

    payload: Any
    render: Render
    timeout_s: float | None = None
    stream: bool = False
    raw_format: str | None = None  # text2image with `Accept: image/png`: answer with the bytes
    reservation: Reservation | None = None
    webhook: str | None = None

    def submit(self, engine: Engine, request: Request, **options: Any) -> JobHandle:
        return engine.submit(
            self.payload,
            request_id_of(request),
            timeout_s=self.timeout_s,
            reservation=self.reservation,
            **options,
        )


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KEEPALIVE = b": keep-alive\n\n"


async def respond(request: Request, engine: Engine, prepared: Prepared) -> Response:
    """/infer's answer: JSON, raw image bytes (`Accept: image/...`), or SSE when streaming."""
    if prepared.stream:
        handle = prepared.submit(engine, request, observed=True)
        return event_stream(handle, prepared.render, engine.settings.stream_keepalive_s)
    handle = prepared.submit(engine, request)
    output = await handle.result(functools.partial(wait_for_disconnect, request))
    if prepared.raw_format is not None:
        return await raw_image(engine, handle, output.image, output.seed, prepared.raw_format)
    rendered = await prepared.render(output, handle)
    return Response(rendered.body, media_type="application/json")


async def raw_image(engine: Engine, handle: JobHandle, image: Any, seed: int, fmt: str) -> Response:
    """The body is the image itself; the seed and timings go in headers."""
    data = await engine.run_cpu(encode_image, image, fmt)
    headers = {"X-Seed": str(seed), "Server-Timing": server_timing(handle.timings())}
    return Response(data, media_type=MEDIA_TYPES[fmt], headers=headers)


def event_stream(
    handle: JobHandle,
    render: Render,
    heartbeat_s: float,
    *,
    after: int = 0,
    cancel_on_drop: bool = True,
) -> StreamingResponse:
    """The job's events as SSE: `queued`, `started`, `progress`/`token`, then `result`/`error`.

    Each event carries its number as the SSE `id`, so a client can resume with `Last-Event-ID`.
    With `cancel_on_drop`, a client that drops the stream cancels the job, exactly like a
    non-streaming request whose client leaves.
    """

    async def body() -> AsyncIterator[bytes]:
        try:
            async for number, event in handle.events(after, heartbeat_s):
                if isinstance(event, Heartbeat):
                    yield KEEPALIVE
                    continue
                if isinstance(event, Succeeded):
                    data = (await render(event.output, handle)).body
                elif isinstance(event, Failed):
                    data = json_bytes(error_body(event.error, handle.request_id))
                else:
                    data = json_bytes(event.data())
                yield b"id: %d\nevent: %s\ndata: %s\n\n" % (number, event.kind.encode(), data)
        finally:
            if cancel_on_drop:
                handle.cancel(StopReason.CLIENT_GONE)

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

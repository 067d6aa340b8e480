"""Server-Sent Events for a queued job: position, start, progress or tokens, then the result.

`job_events` turns one job's life into a sequence of events and is shared by `/infer`'s SSE and
the OpenAI-compatible chat stream; each renders the events in its own wire format. A stream that
the client drops cancels its job, exactly like a disconnected non-streaming request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from hunyuan_service.errors import (
    InternalError,
    JobCancelled,
    ServiceError,
    error_body,
)
from hunyuan_service.http_io import scheduler_for, wait_for_disconnect
from hunyuan_service.jobs import Job, StopReason
from hunyuan_service.service import Service, request_id_of
from hunyuan_service.worker import Reservation, Scheduler

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class JobEvents:
    """Collects a job's events on the event loop; `sink` is what the scheduler calls."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    def sink(self, event: str, data: dict[str, Any]) -> None:
        self.queue.put_nowait((event, data))


async def job_events(
    scheduler: Scheduler, job: Job, events: JobEvents, keepalive_s: float
) -> AsyncIterator[tuple[str, Any]]:
    """Yields `(kind, data)` until the job ends.

    Kinds: `queued` ({"position"}), `started`, `progress`, `token`, `keepalive` (None), and last
    either `result` (the model output) or `error` (a `ServiceError`).
    """
    unregister = scheduler.on_queue_changed(lambda: events.sink("_moved", {}))
    job.future.add_done_callback(lambda _future: events.sink("_done", {}))
    last_position = job.admitted_position
    try:
        # The first event always says where the job was admitted, even if it started since.
        yield "queued", {"position": last_position}
        while True:
            position = scheduler.position(job)
            if position and position != last_position:
                last_position = position
                yield "queued", {"position": position}
            if job.future.done() and events.queue.empty():
                break
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                yield "error", scheduler.expire(job)
                return
            try:
                kind, data = await asyncio.wait_for(
                    events.queue.get(), timeout=min(keepalive_s, remaining)
                )
            except asyncio.TimeoutError:
                yield "keepalive", None
                continue
            if not kind.startswith("_"):
                yield kind, data
        yield _outcome(job)
    finally:
        unregister()
        if not job.future.done():
            scheduler.cancel(job, StopReason.CLIENT_GONE)


def _outcome(job: Job) -> tuple[str, Any]:
    if job.future.cancelled():
        return "error", JobCancelled("the job was cancelled")
    error = job.future.exception()
    if error is None:
        return "result", job.future.result()
    if isinstance(error, ServiceError):
        return "error", error
    return "error", InternalError(f"internal error; see the server log for {job.request_id}")


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


KEEPALIVE = ": keep-alive\n\n"


async def submit_and_respond(
    request: Request,
    service: Service,
    payload: Any,
    *,
    timeout_s: float | None,
    stream: bool,
    render: Callable[[Any, Job], Awaitable[bytes]],
    reservation: Reservation | None = None,
) -> Response:
    """Queues `payload` and answers with one JSON body, or with SSE events when `stream`.

    `render(output, job)` returns the JSON body of a successful result, already serialised (off
    the event loop when it is large); the SSE `result` event carries the same body, and the
    `error` event the same error body as a non-streamed request.
    """
    scheduler = scheduler_for(service)
    request_id = request_id_of(request)
    if not stream:
        job = scheduler.submit(payload, request_id, timeout_s=timeout_s, reservation=reservation)
        output = await scheduler.wait(job, wait_for_disconnect(request))
        return Response(await render(output, job), media_type="application/json")

    events = JobEvents()
    job = scheduler.submit(
        payload, request_id, timeout_s=timeout_s, sink=events.sink, reservation=reservation
    )

    async def body() -> AsyncIterator[str | bytes]:
        keepalive = service.settings.stream_keepalive_s
        async for kind, data in job_events(scheduler, job, events, keepalive):
            if kind == "keepalive":
                yield KEEPALIVE
            elif kind == "result":
                yield b"event: result\ndata: " + await render(data, job) + b"\n\n"
            elif kind == "error":
                yield sse("error", error_body(data, request_id))
            else:
                yield sse(kind, data)

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

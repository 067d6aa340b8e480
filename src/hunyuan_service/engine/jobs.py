"""A job (one admitted request), its status and event history, and the FIFO queue that holds it."""

from __future__ import annotations

import asyncio
import collections
import enum
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from hunyuan_service.engine.events import (
    Event,
    Failed,
    Heartbeat,
    Progress,
    Queued,
    Started,
    Succeeded,
    Token,
)
from hunyuan_service.errors import ServiceError


class StopReason(str, enum.Enum):
    CLIENT_GONE = "client_disconnected"
    USER = "cancelled_by_user"
    DEADLINE = "deadline"
    SHUTDOWN = "shutdown"


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class EventRelay:
    """Carries jobs' events from the model thread to the event loop, a burst at a time.

    `call_soon_threadsafe` costs the calling thread about 5 us (a write to the loop's wake-up
    socket) and wakes the loop each time, and a continuous decoder's step makes one token event
    for every streamed row. An event put while a delivery is already scheduled joins it, so a
    step's events cost one hop. Events are recorded in the order they were put, and before
    anything the model thread hands to the loop after them (a job's outcome included): a
    delivery is scheduled no later than the first event it carries.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[Job, Event]] = []
        self._scheduled = False

    def put(self, job: Job, event: Event) -> None:
        """From any thread."""
        with self._lock:
            self._pending.append((job, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        for job, event in pending:
            job.record(event)


@dataclass(eq=False)
class Job:
    """One admitted request: its payload, deadline, status and the events it has produced.

    Everything but `should_stop`, `request_stop`, `progress` and `token` runs on the event
    loop. The model thread reports progress and text through those two, which hop to the loop
    through the job's `relay`.
    """

    id: str
    request_id: str
    payload: Any
    deadline: float
    budget_s: float  # the time the job was granted: REQUEST_TIMEOUT_S, or the request's shorter one
    done: asyncio.Future[None]  # resolved (to None) when the job reaches a final status
    relay: EventRelay  # the loop's, for the events the model thread reports
    observed: bool = False  # someone streams or polls it: keep progress and token events
    detached: bool = False  # a jobs-API job, which outlives the request that made it
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    status: JobStatus = JobStatus.QUEUED
    stop_reason: StopReason | None = None
    output: Any = None
    error: ServiceError | None = None
    history: list[Event] = field(default_factory=list)
    position: int = 0  # the last position announced: 1 = next to run, 0 once started
    timer: asyncio.TimerHandle | None = None
    # The submitting request's own wake-up, set with `done`: awaited directly, it may be
    # cancelled with that request without touching `done` (cheaper than `asyncio.shield`).
    waiter: asyncio.Future[None] | None = None
    # A plain flag, not a threading.Event: one attribute write is atomic, and an Event costs a
    # lock and a condition per job.
    _stop: bool = False
    _changed: asyncio.Event | None = None  # made by the first reader that has to wait

    # -- the worker thread's side -----------------------------------------------------------

    def should_stop(self) -> bool:
        """Polled from the worker thread between steps: cancelled, or past the deadline."""
        if self._stop:
            return True
        if time.monotonic() >= self.deadline:
            self.stop_reason = self.stop_reason or StopReason.DEADLINE
            return True
        return False

    def request_stop(self, reason: StopReason) -> None:
        self.stop_reason = self.stop_reason or reason
        self._stop = True

    def progress(self, step: int, total: int) -> None:
        """Called from the worker thread after each step; kept only if someone will read it."""
        if self.observed:
            self.relay.put(self, Progress(step, total))

    def token(self, text: str) -> None:
        """Called from the worker thread with new text; kept only if someone will read it."""
        if self.observed:
            self.relay.put(self, Token(text))

    def stop_reason_value(self) -> str:
        return (self.stop_reason or StopReason.CLIENT_GONE).value

    # -- the event loop's side --------------------------------------------------------------

    def record(self, event: Event) -> None:
        """Appends an event and wakes the readers; nothing is recorded after the final event.

        An unobserved job (a plain request that nobody streams) keeps only its final event.
        """
        if self.done.done() or not (self.observed or isinstance(event, (Succeeded, Failed))):
            return
        self.history.append(event)
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def announce_position(self, position: int) -> None:
        if position != self.position:
            self.position = position
            if self.observed:
                self.record(Queued(position))

    def mark_started(self) -> None:
        self.status = JobStatus.RUNNING
        self.started_at = time.monotonic()
        self.position = 0
        self.record(Started())

    def finish(
        self, status: JobStatus, *, output: Any = None, error: ServiceError | None = None
    ) -> bool:
        """Gives the job its final status once; later calls (a late result) are ignored."""
        if self.done.done():
            return False
        self.finished_at = self.finished_at or time.monotonic()
        self.record(Succeeded(output) if error is None else Failed(error))
        self.status, self.output, self.error = status, output, error
        if self.timer is not None:
            self.timer.cancel()
        self.done.set_result(None)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        return True

    def forget_output(self) -> None:
        """Drops the model output (and the final event's reference to it) once a front-end has
        kept its own rendering: a stored 1024² image is 3 MB as pixels, a third of that as PNG."""
        if self.status is JobStatus.SUCCEEDED:
            self.output = None
            if self.history and isinstance(self.history[-1], Succeeded):
                self.history[-1] = Succeeded(None)

    async def events(
        self, after: int = 0, heartbeat_s: float | None = None
    ) -> AsyncIterator[tuple[int, Event | Heartbeat]]:
        """Yields `(number, event)` from event number `after + 1` on, until the final event.

        Events are numbered from 1 in the order they happened, so a reader can resume after the
        last number it saw. A `Heartbeat` (numbered like the last real event) comes after
        `heartbeat_s` without news.
        """
        index = max(after, 0)
        while True:
            while index < len(self.history):
                event = self.history[index]
                index += 1
                yield index, event
                if isinstance(event, (Succeeded, Failed)):
                    return
            if self.done.done():
                return  # `after` was at or past the final event: nothing more will come
            if self._changed is None:
                self._changed = asyncio.Event()
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=heartbeat_s)
            except asyncio.TimeoutError:
                yield index, Heartbeat()

    def timings(self) -> dict[str, float]:
        end = self.finished_at or time.monotonic()
        start = self.started_at or end
        return {
            "queue_ms": round((start - self.enqueued_at) * 1000, 2),
            "inference_ms": round((end - start) * 1000, 2),
            "total_ms": round((end - self.enqueued_at) * 1000, 2),
        }


class JobQueue(asyncio.Queue["Job"]):
    """asyncio.Queue plus removal of a job that left while still waiting.

    `_init` is the hook asyncio's own queue subclasses override; owning it here makes the deque
    ours, so `discard` and `position` may use it. Puts never block (admission is checked first),
    so no waiting putter needs waking after a removal.
    """

    def _init(self, maxsize: int) -> None:
        self._queue: collections.deque[Job] = collections.deque()

    def discard(self, job: Job) -> bool:
        try:
            self._queue.remove(job)
        except ValueError:
            return False
        return True

    def put_front(self, job: Job) -> None:
        """Gives a job taken off the queue its place back, at the head."""
        self._queue.appendleft(job)

    def position(self, job: Job) -> int | None:
        try:
            return self._queue.index(job)
        except ValueError:
            return None

    def waiting(self) -> collections.deque[Job]:
        return self._queue

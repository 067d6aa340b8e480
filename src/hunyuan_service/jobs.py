"""A queued request (`Job`) and the FIFO queue that holds jobs until the worker takes them."""

from __future__ import annotations

import asyncio
import collections
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

EventSink = Callable[[str, dict[str, Any]], None]


class StopReason(str, enum.Enum):
    CLIENT_GONE = "client_disconnected"
    DEADLINE = "deadline"
    SHUTDOWN = "shutdown"


@dataclass(eq=False)
class Job:
    """One admitted request. Its Future resolves to the model output or a `ServiceError`."""

    request_id: str
    payload: Any
    deadline: float
    budget_s: float  # the time the job was granted: REQUEST_TIMEOUT_S, or the request's shorter one
    future: asyncio.Future[Any]
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    sink: EventSink | None = None
    stop_reason: StopReason | None = None
    admitted_position: int = 0  # 1 = next to run; see Scheduler.position
    _stop: threading.Event = field(default_factory=threading.Event)

    def should_stop(self) -> bool:
        """Polled from the worker thread between steps: cancelled, or past the deadline."""
        if self._stop.is_set():
            return True
        if time.monotonic() >= self.deadline:
            self.stop_reason = self.stop_reason or StopReason.DEADLINE
            return True
        return False

    def request_stop(self, reason: StopReason) -> None:
        self.stop_reason = self.stop_reason or reason
        self._stop.set()

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Forwards an event to the job's sink; safe to call from the worker thread."""
        if self.sink is not None:
            self.future.get_loop().call_soon_threadsafe(self.sink, event, data)

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

    def position(self, job: Job) -> int | None:
        try:
            return self._queue.index(job)
        except ValueError:
            return None

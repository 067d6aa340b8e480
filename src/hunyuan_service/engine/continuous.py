"""Continuous batching: jobs join a model's running decode between steps and leave when done.

A mixin of `Scheduler`, used when the model can decode continuously (image2text) and
MAX_BATCH_SIZE is above 1. The worker opens a *session*: one long call of
`model.serve_continuously(feed)` on the model thread, which runs while there is work. The worker
hands queued jobs to the session through a `RowFeed` whenever fewer than MAX_BATCH_SIZE are in
it, oldest first; the model thread takes them between steps, and reports each job's outcome the
moment its row ends. The queue, positions, deadlines, cancellation and the drain work as for
one job at a time. Nothing here knows what a KV cache is.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hunyuan_service.engine.jobs import Job, JobStatus, StopReason
from hunyuan_service.engine.metrics import Histogram
from hunyuan_service.engine.worker import generic_500, shutdown_error
from hunyuan_service.errors import InternalError, ServiceError
from hunyuan_service.models.base import JobContext

logger = logging.getLogger(__name__)


class RowFeed:
    """The hand-over between the event loop (`put`) and the model thread (`take`, `finished`).

    The model thread closes the feed when it has nothing left (`close_if_idle`), under the same
    lock as `put`, so a job is never handed to a session that has just ended.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_finished: Callable[..., None]) -> None:
        self._loop = loop
        self._on_finished = on_finished
        self._lock = threading.Lock()
        self._pending: collections.deque[tuple[Any, Any, JobContext]] = collections.deque()
        self._closed = False

    # -- the event loop's side -------------------------------------------------------------

    def put(self, key: Any, payload: Any, ctx: JobContext) -> bool:
        """Hands a job over; False when the session has already ended."""
        with self._lock:
            if self._closed:
                return False
            self._pending.append((key, payload, ctx))
            return True

    # -- the model thread's side -----------------------------------------------------------

    def take(self) -> list[tuple[Any, Any, JobContext]]:
        """The jobs handed over since the last call, oldest first: (key, payload, context)."""
        with self._lock:
            taken = list(self._pending)
            self._pending.clear()
        return taken

    def close_if_idle(self) -> bool:
        """Ends the session unless a job has just been handed over."""
        with self._lock:
            if self._pending:
                return False
            self._closed = True
            return True

    def finished(self, key: Any, outcome: Any) -> None:
        """Reports a job's output, or the exception it ended with."""
        try:
            self._loop.call_soon_threadsafe(self._on_finished, key, outcome)
        except RuntimeError:  # the loop has closed: nobody waits any more
            logger.debug("a row finished after the event loop closed")


class ContinuousLoop:
    """The worker's loop for a model that decodes continuously; see the module docstring."""

    if TYPE_CHECKING:
        _queue: Any
        _thread: Any
        _arrival: asyncio.Event
        _observed_waiting: int
        model: Any
        running: list[Job]
        max_batch_size: int
        counters: collections.Counter[str]
        queue_wait_seconds: Histogram
        batch_sizes: Histogram

        def _runnable(self, job: Job) -> bool: ...
        def _settle_now(self, job: Job, outcome: Any) -> None: ...
        def _queue_moved(self) -> None: ...
        def _set_idle_if_empty(self) -> None: ...
        def _record_duration(self, seconds: float) -> None: ...
        def _finish(
            self,
            job: Job,
            status: JobStatus,
            *,
            output: Any = None,
            error: ServiceError | None = None,
        ) -> None: ...

    async def _work_continuously(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            head = await self._queue.get()
            self._observed_waiting -= head.observed
            if not self._runnable(head):  # ended or expired while queued: no session for it
                self._queue_moved()
                self._set_idle_if_empty()
                continue
            feed = RowFeed(loop, self._row_finished)
            try:
                self._give(feed, head)
                session = asyncio.ensure_future(
                    self._thread.run(self.model.serve_continuously, feed)
                )
                while not session.done():
                    self._refill(feed)
                    self._arrival.clear()
                    arrival = asyncio.ensure_future(self._arrival.wait())
                    await asyncio.wait({session, arrival}, return_when=asyncio.FIRST_COMPLETED)
                    arrival.cancel()
                await session  # raises what broke the session
            except asyncio.CancelledError:
                self._end_session(lambda _job: shutdown_error(), StopReason.SHUTDOWN)
                raise
            except Exception:  # one session's failure must never end the loop
                logger.exception("the continuous decoder failed; its jobs fail")
                self._end_session(lambda job: InternalError(generic_500(job)), None)
            finally:
                self._queue_moved()
                self._set_idle_if_empty()

    def _refill(self, feed: RowFeed) -> None:
        """Hands queued jobs to the session, oldest first, while it has fewer than the limit."""
        moved = False
        while len(self.running) < self.max_batch_size and self._queue.qsize():
            job = self._queue.get_nowait()
            self._observed_waiting -= job.observed
            moved = True
            if self._runnable(job) and not self._give(feed, job):
                self._queue.put_front(job)  # the session ended meanwhile: it opens the next
                self._observed_waiting += job.observed
                break
        if moved:
            self._queue_moved()

    def _give(self, feed: RowFeed, job: Job) -> bool:
        context = JobContext(
            job.should_stop, job.progress, job.token, job.stop_reason_value, job.observed
        )
        if not feed.put(job, job.payload, context):
            return False
        job.mark_started()
        self.queue_wait_seconds.observe(job.started_at - job.enqueued_at)  # type: ignore[operator]
        self.running.append(job)
        self.batch_sizes.observe(len(self.running))
        return True

    def _row_finished(self, job: Job, outcome: Any) -> None:
        """On the event loop: a row ended with `outcome` (its output or an exception)."""
        if job in self.running:
            self.running.remove(job)
        ended = time.monotonic()
        if not job.done.done():  # a cancelled job ended earlier, and keeps that time
            job.finished_at = ended
        self._settle_now(job, outcome)
        if job.status is JobStatus.SUCCEEDED and job.started_at is not None:
            # MAX_BATCH_SIZE jobs of about this length run at once: what Retry-After counts.
            self._record_duration(ended - job.started_at)
        self._arrival.set()  # room for the next job
        self._set_idle_if_empty()

    def _end_session(self, error: Callable[[Job], ServiceError], reason: StopReason | None) -> None:
        """Fails every job the session still held (it broke, or the service stops)."""
        for job in self.running:
            if reason is not None:
                job.request_stop(reason)
            self._finish(job, JobStatus.FAILED, error=error(job))
        self.running = []

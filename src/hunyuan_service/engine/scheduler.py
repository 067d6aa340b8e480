"""The single-GPU scheduler: a bounded FIFO queue drained by one worker that runs one job at a time.

A request becomes a `Job`. Admission is decided at once (`QueueFull` when the queue is full), the
worker runs `model.infer` on its own thread, and the job's `done` future tells the loop when it
ends. A job ends exactly once: with its output, an error, a cancel or its deadline. A cancelled
or expired job is removed from the queue, or asked to stop at the model's next step. Importing
this module imports no ML framework.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hunyuan_service.engine.alarms import Alarms
from hunyuan_service.engine.continuous import ContinuousLoop
from hunyuan_service.engine.jobs import EventRelay, Job, JobQueue, JobStatus, StopReason
from hunyuan_service.engine.lifecycle import Lifecycle, State
from hunyuan_service.engine.metrics import Histogram
from hunyuan_service.engine.runner import ModelThread
from hunyuan_service.engine.worker import WorkerLoop, deadline_error, log_fields, shutdown_error
from hunyuan_service.errors import (
    JobCancelled,
    QueueFull,
    Unavailable,
)
from hunyuan_service.models.base import InferenceModel

logger = logging.getLogger(__name__)

# A waiting request starts watching for its client's disconnect after this long.
WATCH_AFTER_S = 0.05
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class Scheduler(WorkerLoop, ContinuousLoop):
    """Admits jobs into a bounded FIFO queue and runs them one at a time on a worker task.

    Args:
        model: a loaded model; only the worker thread calls its `infer`.
        max_queue_size: how many jobs may wait behind the running one.
        request_timeout_s: the longest a job may spend queued plus running.
    """

    def __init__(
        self,
        model: InferenceModel,
        max_queue_size: int,
        request_timeout_s: float,
        lifecycle: Lifecycle | None = None,
        *,
        max_batch_size: int = 1,
        batch_wait_s: float = 0.0,
        alarms: Alarms | None = None,
    ):
        self.model = model
        # A model that cannot batch runs one job at a time whatever the setting says.
        batches = model.supports_batching or model.decodes_continuously()
        self.max_batch_size = max_batch_size if batches else 1
        self.batch_wait_s = batch_wait_s
        self.lifecycle = lifecycle or Lifecycle()
        self.max_queue_size = max_queue_size
        self.request_timeout_s = request_timeout_s
        self.counters: collections.Counter[str] = collections.Counter()
        self.produced: collections.Counter[str] = collections.Counter()
        # (final status, detached) -> jobs; detached jobs are the jobs API's
        self.final_statuses: collections.Counter[tuple[str, bool]] = collections.Counter()
        self.running: list[Job] = []  # one job, or one batch
        self._queue = JobQueue(maxsize=max_queue_size)
        self._relay: EventRelay | None = None  # made on the loop, by the first submit
        self._reserved = 0
        self._shutting_down = False  # the drain's deadline has passed: nothing more runs
        self._observed_waiting = 0  # queued jobs that want position updates
        self._task: asyncio.Task[None] | None = None
        self._thread = ModelThread()
        self._idle = asyncio.Event()
        self._avg_job_s: float | None = None
        self._arrival = asyncio.Event()  # set on each admission, for a batch waiting to fill
        # Jobs running or queued when the last batch ended: how many to expect in the next one.
        self._last_in_flight = 1
        self.inference_seconds = Histogram()
        self.queue_wait_seconds = Histogram()
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.alarms = alarms or Alarms()  # the request path's coarse timers

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        # A model that decodes continuously takes jobs into its running batch between steps
        # (engine/continuous.py); otherwise batches form at the head of the queue.
        continuous = self.max_batch_size > 1 and self.model.decodes_continuously()
        work = self._work_continuously() if continuous else self._work()
        self._task = asyncio.create_task(work, name="hunyuan-worker")
        self._idle.set()
        if self.lifecycle.state is State.STARTING:  # a stop signal may have come during loading
            self.lifecycle.advance(State.READY)

    @property
    def worker_alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def drain(self, timeout_s: float) -> bool:
        """Stops admitting, then waits up to `timeout_s` for queued and running jobs to finish."""
        self.lifecycle.begin_drain()
        deadline = time.monotonic() + timeout_s
        while (self.running or self._queue.qsize() or self._reserved) and (
            self.worker_alive and time.monotonic() < deadline
        ):
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
        return not (self.running or self._queue.qsize() or self._reserved)

    def end_for_shutdown(self) -> int:
        """Ends every queued and running job now with a 503 `shutdown` (retry elsewhere), asks
        running ones to stop at their next step or token, and refuses reserved places; returns
        how many jobs it ended. The drain's deadline calls it, before the server would cut the
        connections."""
        self._shutting_down = True
        ended = 0
        while True:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            self._observed_waiting -= job.observed
            ended += self._end_for_shutdown(job, "queued")
        for job in self.running:
            ended += self._end_for_shutdown(job, "running")
        self._set_idle_if_empty()
        return ended

    def _end_for_shutdown(self, job: Job, stage: str) -> bool:
        job.request_stop(StopReason.SHUTDOWN)
        if job.done.done():
            return False
        self.counters[f"cancelled_{stage}_{StopReason.SHUTDOWN.value}"] += 1
        logger.warning(
            "shutdown deadline reached: job ended with a 503",
            extra=log_fields(job, reason=StopReason.SHUTDOWN.value, stage=stage),
        )
        self._finish(job, JobStatus.FAILED, error=shutdown_error())
        return True

    async def stop(self) -> None:
        """Stops the worker; jobs still queued or running get a 503 rather than silence."""
        self.lifecycle.mark_stopped()
        self.end_for_shutdown()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._thread.stop()

    # -- admission ---------------------------------------------------------------------------

    def _check_admission(self) -> None:
        if not self.lifecycle.accepting:
            raise Unavailable(
                "the service is not accepting requests (starting or draining)",
                retry_after_s=self.retry_after_s(self.max_queue_size),
            )
        if not self.worker_alive:
            raise Unavailable("the worker has stopped; the service needs a restart")
        waiting = self._queue.qsize() + self._reserved
        if waiting >= self.max_queue_size:
            self.counters["rejected_queue_full"] += 1
            raise QueueFull(
                f"the queue is full ({self.max_queue_size} waiting); retry later",
                retry_after_s=self.retry_after_s(waiting + 1),
            )

    def reserve(self) -> Reservation:
        """Holds a queue place while the request is prepared (e.g. images decoded) off the loop.

        This is what makes rejection cheap: a request that would not fit is refused before any
        decoding or tokenizing is spent on it.
        """
        self._check_admission()
        self._reserved += 1
        return Reservation(self)

    def submit(
        self,
        payload: Any,
        request_id: str,
        *,
        timeout_s: float | None = None,
        reservation: Reservation | None = None,
        observed: bool = False,
        job_id: str | None = None,
    ) -> Job:
        """Admits a job at the tail of the queue, or raises `QueueFull` / `Unavailable`.

        `observed` jobs keep their progress and token events for a stream or a later poll.
        """
        if reservation is not None:
            # Admission was decided when the place was reserved; only a dead worker or the
            # drain's deadline refuses now.
            reservation.release()
            if self._shutting_down:
                raise shutdown_error()
            if not self.worker_alive:
                raise Unavailable("the worker has stopped; the service needs a restart")
        else:
            self._check_admission()
        loop = asyncio.get_running_loop()
        relay = self._relay
        if relay is None or relay.loop is not loop:
            relay = self._relay = EventRelay(loop)
        budget = (
            self.request_timeout_s if timeout_s is None else min(timeout_s, self.request_timeout_s)
        )
        job = Job(
            id=job_id or request_id,
            request_id=request_id,
            payload=payload,
            deadline=time.monotonic() + budget,
            budget_s=budget,
            done=loop.create_future(),
            relay=relay,
            observed=observed,
            detached=job_id is not None,
        )
        self._queue.put_nowait(job)
        self._arrival.set()
        self._observed_waiting += observed
        job.announce_position(self._queue.qsize())
        if observed:
            # Nobody may be waiting on a streamed or detached job; its deadline needs a timer.
            # A waited job gets one from `wait`, after WATCH_AFTER_S, unless it ended by then.
            self._arm_deadline(job)
        self.counters["admitted"] += 1
        return job

    def cancel(self, job: Job, reason: StopReason) -> None:
        """Ends a job now: withdraws it from the queue, or asks it to stop at its next step."""
        job.request_stop(reason)
        if reason is StopReason.DEADLINE:
            self._finish(job, JobStatus.EXPIRED, error=deadline_error(job))
        else:
            self._finish(
                job,
                JobStatus.CANCELLED,
                error=JobCancelled("the job was cancelled", code=reason.value),
            )
        if self._queue.discard(job):
            self._observed_waiting -= job.observed
            self.counters[f"cancelled_queued_{reason.value}"] += 1
            logger.info("job withdrawn before running", extra=log_fields(job, reason=reason.value))
            self._queue_moved()
            self._set_idle_if_empty()

    async def wait(self, job: Job, disconnected: Callable[[], Awaitable[Any]] | None = None) -> Any:
        """Returns the job's output, or raises its error; a client that leaves cancels the job.

        `disconnected()` makes an awaitable that completes when the client goes away. It is only
        started once the job has taken `WATCH_AFTER_S`: watching costs a task per request, and
        most short jobs end before it would matter. The job's deadline timer is armed then too;
        until it fires, the worker itself refuses to run or continue a job past its deadline.
        """
        if not job.done.done():
            loop = asyncio.get_running_loop()
            watchers: list[asyncio.Task[Any]] = []

            def client_left(watcher: asyncio.Task[Any]) -> None:
                if not watcher.cancelled() and watcher.exception() is None:
                    self.cancel(job, StopReason.CLIENT_GONE)

            def watch() -> None:
                self._arm_deadline(job)
                if disconnected is not None:
                    watchers.append(asyncio.ensure_future(disconnected()))
                    watchers[0].add_done_callback(client_left)

            delay = min(WATCH_AFTER_S, job.deadline - time.monotonic())
            alarm = self.alarms.arm(max(delay, 0.0), watch)
            # Cancelling this wait must not cancel the job's own future: the first waiter gets
            # a future of its own, which `Job.finish` sets, and any later one a shield.
            if job.waiter is None:
                job.waiter = waiter = loop.create_future()
            else:
                waiter = asyncio.shield(job.done)
            try:
                await waiter
            except asyncio.CancelledError:
                self.cancel(job, StopReason.CLIENT_GONE)
                raise
            finally:
                self.alarms.disarm(alarm)
                for watcher in watchers:
                    watcher.cancel()
        if job.error is not None:
            raise job.error
        return job.output

    def _arm_deadline(self, job: Job) -> None:
        if job.timer is None and not job.done.done():
            delay = max(job.deadline - time.monotonic(), 0.0)
            job.timer = asyncio.get_running_loop().call_later(delay, self._deadline_passed, job)

    def _deadline_passed(self, job: Job) -> None:
        if not job.done.done():
            self.cancel(job, StopReason.DEADLINE)

    # -- observation -------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        return bool(self.running)

    def has_room(self) -> bool:
        """Whether a job submitted now would start at once: nothing waits or is being
        prepared, and the running batch has a free row (one job, without batching)."""
        return not (self._queue.qsize() or self._reserved) and (
            len(self.running) < self.max_batch_size
        )

    def position(self, job: Job) -> int | None:
        """0 for the running job, 1 for the first waiting one, None once finished."""
        if job.status is JobStatus.RUNNING:
            return 0
        index = self._queue.position(job)
        return None if index is None else index + 1

    def retry_after_s(self, position: int) -> int:
        """Whole seconds until `position` jobs ahead should have run, from recent run times.

        A position counts jobs; with batching, they run `max_batch_size` at a time.
        """
        per_run = self._avg_job_s if self._avg_job_s is not None else 1.0
        runs = math.ceil(max(position, 1) / self.max_batch_size)
        return max(1, math.ceil(per_run * runs))

    def _queue_moved(self) -> None:
        """Tells each waiting job that streams or is polled its new position."""
        if not self._observed_waiting:
            return
        for index, job in enumerate(self._queue.waiting(), start=1):
            job.announce_position(index)

    def _set_idle_if_empty(self) -> None:
        if not self.running and self._queue.qsize() == 0 and self._reserved == 0:
            self._idle.set()


class Reservation:
    """A queue place held during preparation; release it on every path (it is a context manager)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler: Scheduler | None = scheduler

    def release(self) -> None:
        if self._scheduler is not None:
            self._scheduler._reserved -= 1
            self._scheduler._set_idle_if_empty()
            self._scheduler = None

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

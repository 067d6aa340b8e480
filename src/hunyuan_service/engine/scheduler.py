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

from hunyuan_service.engine.jobs import Job, JobQueue, JobStatus, StopReason
from hunyuan_service.engine.lifecycle import Lifecycle, State
from hunyuan_service.engine.metrics import Histogram
from hunyuan_service.engine.runner import ModelThread
from hunyuan_service.errors import (
    DeadlineExceeded,
    InternalError,
    JobCancelled,
    OutOfMemory,
    QueueFull,
    ServiceError,
    Unavailable,
)
from hunyuan_service.models.base import InferenceModel, JobContext

logger = logging.getLogger(__name__)

# A waiting request starts watching for its client's disconnect after this long.
WATCH_AFTER_S = 0.05


class Scheduler:
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
    ):
        self.model = model
        self.lifecycle = lifecycle or Lifecycle()
        self.max_queue_size = max_queue_size
        self.request_timeout_s = request_timeout_s
        self.counters: collections.Counter[str] = collections.Counter()
        # (final status, detached) -> jobs; detached jobs are the jobs API's
        self.final_statuses: collections.Counter[tuple[str, bool]] = collections.Counter()
        self.current: Job | None = None
        self._queue = JobQueue(maxsize=max_queue_size)
        self._reserved = 0
        self._observed_waiting = 0  # queued jobs that want position updates
        self._task: asyncio.Task[None] | None = None
        self._thread = ModelThread()
        self._idle = asyncio.Event()
        self._avg_job_s: float | None = None
        self.inference_seconds = Histogram()
        self.queue_wait_seconds = Histogram()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._task = asyncio.create_task(self._work(), name="hunyuan-worker")
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
        while (self.current is not None or self._queue.qsize() or self._reserved) and (
            self.worker_alive and time.monotonic() < deadline
        ):
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
        return self.current is None and self._queue.qsize() == 0

    async def stop(self) -> None:
        """Stops the worker; jobs still queued or running get a 503 rather than silence."""
        self.lifecycle.mark_stopped()
        shutting_down = "the service is shutting down; retry elsewhere"
        while True:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            self._observed_waiting -= job.observed
            self._finish(job, JobStatus.FAILED, error=Unavailable(shutting_down))
        if self.current is not None:
            self.current.request_stop(StopReason.SHUTDOWN)
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
            # Admission was decided when the place was reserved; only a dead worker refuses now.
            reservation.release()
            if not self.worker_alive:
                raise Unavailable("the worker has stopped; the service needs a restart")
        else:
            self._check_admission()
        loop = asyncio.get_running_loop()
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
            observed=observed,
            detached=job_id is not None,
        )
        self._queue.put_nowait(job)
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
            logger.info("job withdrawn before running", extra=_log(job, reason=reason.value))
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
            timer = loop.call_later(max(delay, 0.0), watch)
            try:
                # Shielded: cancelling this waiter must not cancel the job's own future.
                await asyncio.shield(job.done)
            except asyncio.CancelledError:
                self.cancel(job, StopReason.CLIENT_GONE)
                raise
            finally:
                if timer is not None:
                    timer.cancel()
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
        return self.current is not None

    def position(self, job: Job) -> int | None:
        """0 for the running job, 1 for the first waiting one, None once finished."""
        if job is self.current and not job.done.done():
            return 0
        index = self._queue.position(job)
        return None if index is None else index + 1

    def retry_after_s(self, position: int) -> int:
        """Whole seconds until `position` jobs ahead should have run, from recent job times."""
        per_job = self._avg_job_s if self._avg_job_s is not None else 1.0
        return max(1, math.ceil(per_job * max(position, 1)))

    def _queue_moved(self) -> None:
        """Tells each waiting job that streams or is polled its new position."""
        if not self._observed_waiting:
            return
        for index, job in enumerate(self._queue.waiting(), start=1):
            job.announce_position(index)

    def _set_idle_if_empty(self) -> None:
        if self.current is None and self._queue.qsize() == 0 and self._reserved == 0:
            self._idle.set()

    # -- the worker --------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            self._observed_waiting -= job.observed
            self._queue_moved()
            try:
                await self._run_one(job)
            except asyncio.CancelledError:
                job.request_stop(StopReason.SHUTDOWN)
                self._finish(
                    job, JobStatus.FAILED, error=Unavailable("the service is shutting down")
                )
                raise
            except Exception:  # one job's failure must never end the loop
                logger.exception("worker bookkeeping failed", extra=_log(job))
                self._finish(job, JobStatus.FAILED, error=InternalError(_generic_500(job)))
            finally:
                self.current = None
                self._set_idle_if_empty()

    async def _run_one(self, job: Job) -> None:
        if job.done.done():
            # Ended while queued but not yet removed (a race with get); it never runs.
            self.counters["skipped_cancelled"] += 1
            return
        if job.should_stop():
            self.counters["expired_queued"] += 1
            logger.info("deadline passed while queued", extra=_log(job))
            self._finish(job, JobStatus.EXPIRED, error=deadline_error(job))
            return
        self.current = job
        job.mark_started()
        self.queue_wait_seconds.observe(job.started_at - job.enqueued_at)  # type: ignore[operator]
        ctx = JobContext(job.should_stop, job.progress, job.token, job.stop_reason_value)
        try:
            result = await self._thread.run(self.model.infer, job.payload, ctx)
        except JobCancelled:
            job.finished_at = time.monotonic()
            reason = job.stop_reason or StopReason.CLIENT_GONE
            self.counters[f"cancelled_running_{reason.value}"] += 1
            logger.info("running job stopped early", extra=_log(job, reason=reason.value))
            if reason is StopReason.DEADLINE:
                self._finish(job, JobStatus.EXPIRED, error=deadline_error(job))
            else:
                status = JobStatus.FAILED if reason is StopReason.SHUTDOWN else JobStatus.CANCELLED
                self._finish(
                    job, status, error=JobCancelled("the job was cancelled", code=reason.value)
                )
        except Exception as exc:
            job.finished_at = time.monotonic()
            if self.model.is_out_of_memory(exc):
                self.counters["out_of_memory"] += 1
                logger.error("out of memory", extra=_log(job))
                await self._thread.run(self.model.recover_from_oom)
                error: ServiceError = OutOfMemory(
                    "the model ran out of accelerator memory for this request; "
                    "try a smaller size, fewer steps or fewer images"
                )
            else:
                self.counters["failed"] += 1
                logger.exception("inference failed", extra=_log(job))
                error = InternalError(_generic_500(job))
            self._finish(job, JobStatus.FAILED, error=error)
        else:
            job.finished_at = time.monotonic()
            self.counters["completed"] += 1
            self._record_duration(job.finished_at - job.started_at)  # type: ignore[operator]
            self.inference_seconds.observe(job.finished_at - job.started_at)  # type: ignore[operator]
            self._finish(job, JobStatus.SUCCEEDED, output=result)
            if logger.isEnabledFor(logging.INFO):
                logger.info("job done", extra=_log(job, **job.timings()))

    def _finish(
        self, job: Job, status: JobStatus, *, output: Any = None, error: ServiceError | None = None
    ) -> None:
        if job.finish(status, output=output, error=error):
            self.final_statuses[(status.value, job.detached)] += 1

    def _record_duration(self, seconds: float) -> None:
        if self._avg_job_s is None:
            self._avg_job_s = seconds
        else:
            self._avg_job_s = 0.8 * self._avg_job_s + 0.2 * seconds


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


def deadline_error(job: Job) -> DeadlineExceeded:
    """The 504 of a job whose deadline passed, naming the job's own budget."""
    return DeadlineExceeded(
        f"the request did not finish within its deadline ({job.budget_s:g} s); try fewer "
        "steps or a smaller size, or retry when the queue is shorter"
    )


def _generic_500(job: Job) -> str:
    return (
        f"internal error while running the model; see the server log for request {job.request_id}"
    )


def _log(job: Job, **fields: Any) -> dict[str, Any]:
    return {"request_id": job.request_id, **fields}

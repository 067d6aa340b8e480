"""The single-GPU scheduler: a bounded FIFO queue drained by one worker that runs one job at a time.

A request becomes a `Job`. Admission is decided at once (`QueueFull` when the queue is full), the
worker runs `model.infer` in a thread with `asyncio.to_thread`, and the result comes back through
the job's Future. Jobs whose client left, or whose deadline passed, are removed from the queue or
stopped at the next step. Importing this module imports no ML framework.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hunyuan_service.errors import (
    DeadlineExceeded,
    InternalError,
    JobCancelled,
    OutOfMemory,
    QueueFull,
    ServiceError,
    Unavailable,
)
from hunyuan_service.jobs import EventSink, Job, JobQueue, StopReason
from hunyuan_service.metrics import Histogram
from hunyuan_service.models.base import InferenceModel, JobContext

logger = logging.getLogger(__name__)


class Scheduler:
    """Admits jobs into a bounded FIFO queue and runs them one at a time on a worker task.

    Args:
        model: a loaded model; only the worker thread calls its `infer`.
        max_queue_size: how many jobs may wait behind the running one.
        request_timeout_s: the longest a job may spend queued plus running.
    """

    def __init__(self, model: InferenceModel, max_queue_size: int, request_timeout_s: float):
        self.model = model
        self.max_queue_size = max_queue_size
        self.request_timeout_s = request_timeout_s
        self.counters: collections.Counter[str] = collections.Counter()
        self.current: Job | None = None
        self.accepting = False
        self._queue = JobQueue(maxsize=max_queue_size)
        self._reserved = 0
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._avg_job_s: float | None = None
        self.inference_seconds = Histogram()
        self.queue_wait_seconds = Histogram()
        self._queue_changed: set[Callable[[], None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._work(), name="hunyuan-worker")
        self._idle.set()
        self.accepting = True

    @property
    def worker_alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def drain(self, timeout_s: float) -> bool:
        """Stops admitting, then waits up to `timeout_s` for queued and running jobs to finish."""
        self.accepting = False
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
        self.accepting = False
        while True:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            self._resolve(job, error=Unavailable("the service is shutting down; retry elsewhere"))
        if self.current is not None:
            self.current.request_stop(StopReason.SHUTDOWN)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- admission ---------------------------------------------------------------------------

    def _check_admission(self) -> None:
        if not self.accepting:
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
        sink: EventSink | None = None,
        reservation: Reservation | None = None,
    ) -> Job:
        """Admits a job at the tail of the queue, or raises `QueueFull` / `Unavailable`."""
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
            request_id=request_id,
            payload=payload,
            deadline=time.monotonic() + budget,
            budget_s=budget,
            future=loop.create_future(),
            sink=sink,
        )
        self._queue.put_nowait(job)
        job.admitted_position = self._queue.qsize()
        self.counters["admitted"] += 1
        self._notify_queue_changed()
        return job

    def cancel(self, job: Job, reason: StopReason) -> None:
        """Withdraws a queued job, or asks a running one to stop at its next step."""
        job.request_stop(reason)
        if not job.future.done():
            job.future.cancel()
        if self._queue.discard(job):
            self.counters[f"cancelled_queued_{reason.value}"] += 1
            logger.info("job withdrawn before running", extra=_log(job, reason=reason.value))
            self._notify_queue_changed()
            self._set_idle_if_empty()

    async def wait(self, job: Job, disconnected: Awaitable[Any] | None = None) -> Any:
        """Waits for the job's result, its deadline, or its client's disconnect, whichever first.

        Raises `DeadlineExceeded` on the deadline and `JobCancelled` on a disconnect; in both cases
        the job is withdrawn or stopped so that no GPU time is spent on it.
        """
        watcher = asyncio.ensure_future(disconnected) if disconnected is not None else None
        waiting: set[asyncio.Future[Any]] = {job.future}
        if watcher is not None:
            waiting.add(watcher)
        try:
            timeout = max(job.deadline - time.monotonic(), 0.0)
            done, _ = await asyncio.wait(
                waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            self.cancel(job, StopReason.CLIENT_GONE)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if job.future.done() and not job.future.cancelled():
            return job.future.result()
        if watcher is not None and watcher in done:
            self.cancel(job, StopReason.CLIENT_GONE)
            raise JobCancelled("the client disconnected", code=StopReason.CLIENT_GONE.value)
        raise self.expire(job)

    def expire(self, job: Job) -> DeadlineExceeded:
        """Withdraws or stops a job whose deadline has passed; returns the error to answer with.

        Both ways of waiting for a job (a plain request and an event stream) end here.
        """
        self.cancel(job, StopReason.DEADLINE)
        return DeadlineExceeded(
            f"the request did not finish within its deadline ({job.budget_s:g} s); try fewer "
            "steps or a smaller size, or retry when the queue is shorter"
        )

    # -- observation -------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        return self.current is not None

    def position(self, job: Job) -> int | None:
        """0 for the running job, 1 for the first waiting one, None once finished."""
        if job is self.current:
            return 0
        index = self._queue.position(job)
        return None if index is None else index + 1

    def retry_after_s(self, position: int) -> int:
        """Whole seconds until `position` jobs ahead should have run, from recent job times."""
        per_job = self._avg_job_s if self._avg_job_s is not None else 1.0
        return max(1, math.ceil(per_job * max(position, 1)))

    def on_queue_changed(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Registers `callback` for queue movement; returns the function that unregisters it."""
        self._queue_changed.add(callback)
        return lambda: self._queue_changed.discard(callback)

    def _notify_queue_changed(self) -> None:
        for callback in list(self._queue_changed):
            callback()

    def _set_idle_if_empty(self) -> None:
        if self.current is None and self._queue.qsize() == 0 and self._reserved == 0:
            self._idle.set()

    # -- the worker --------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            self._notify_queue_changed()
            try:
                await self._run_one(job)
            except asyncio.CancelledError:
                job.request_stop(StopReason.SHUTDOWN)
                self._resolve(job, error=Unavailable("the service is shutting down"))
                raise
            except Exception:  # one job's failure must never end the loop
                logger.exception("worker bookkeeping failed", extra=_log(job))
                self._resolve(job, error=InternalError(_generic_500(job)))
            finally:
                self.current = None
                self._set_idle_if_empty()

    async def _run_one(self, job: Job) -> None:
        if job.future.done():
            # Cancelled while queued but not yet removed (a race with get); it never runs.
            self.counters["skipped_cancelled"] += 1
            return
        if job.should_stop():
            self.counters["expired_queued"] += 1
            logger.info("deadline passed while queued", extra=_log(job))
            self._resolve(job, error=DeadlineExceeded("the request waited past its deadline"))
            return
        self.current = job
        job.started_at = time.monotonic()
        self.queue_wait_seconds.observe(job.started_at - job.enqueued_at)
        job.emit("started", {})
        ctx = JobContext(
            should_stop=job.should_stop,
            emit=job.emit,
            stop_reason=lambda: (job.stop_reason or StopReason.CLIENT_GONE).value,
        )
        try:
            result = await asyncio.to_thread(self.model.infer, job.payload, ctx)
        except JobCancelled:
            job.finished_at = time.monotonic()
            reason = job.stop_reason or StopReason.CLIENT_GONE
            self.counters[f"cancelled_running_{reason.value}"] += 1
            logger.info("running job stopped early", extra=_log(job, reason=reason.value))
            error: ServiceError = (
                DeadlineExceeded("the request ran past its deadline and was stopped")
                if reason is StopReason.DEADLINE
                else JobCancelled("the job was cancelled", code=reason.value)
            )
            self._resolve(job, error=error)
        except Exception as exc:
            job.finished_at = time.monotonic()
            if self.model.is_out_of_memory(exc):
                self.counters["out_of_memory"] += 1
                logger.error("out of memory", extra=_log(job))
                await asyncio.to_thread(self.model.recover_from_oom)
                self._resolve(
                    job,
                    error=OutOfMemory(
                        "the model ran out of accelerator memory for this request; "
                        "try a smaller size, fewer steps or fewer images"
                    ),
                )
            else:
                self.counters["failed"] += 1
                logger.exception("inference failed", extra=_log(job))
                self._resolve(job, error=InternalError(_generic_500(job)))
        else:
            job.finished_at = time.monotonic()
            self.counters["completed"] += 1
            self._record_duration(job.finished_at - job.started_at)
            self.inference_seconds.observe(job.finished_at - job.started_at)
            self._resolve(job, result=result)
            logger.info("job done", extra=_log(job, **job.timings()))

    def _record_duration(self, seconds: float) -> None:
        if self._avg_job_s is None:
            self._avg_job_s = seconds
        else:
            self._avg_job_s = 0.8 * self._avg_job_s + 0.2 * seconds

    @staticmethod
    def _resolve(job: Job, *, result: Any = None, error: ServiceError | None = None) -> None:
        # A future whose client already left is done (cancelled); setting it again would raise.
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)


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


def _generic_500(job: Job) -> str:
    return (
        f"internal error while running the model; see the server log for request {job.request_id}"
    )


def _log(job: Job, **fields: Any) -> dict[str, Any]:
    return {"request_id": job.request_id, **fields}

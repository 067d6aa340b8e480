"""The worker loop: take the head job (and its batch companions), run the model, settle each job.

A mixin of `Scheduler`, kept apart so that admission and waiting (scheduler.py) and running
(here) each fit in a file; both work on the same queue, counters and model thread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Any

from hunyuan_service.engine.batching import gather_companions
from hunyuan_service.engine.jobs import Job, JobQueue, JobStatus, StopReason
from hunyuan_service.engine.metrics import Histogram
from hunyuan_service.engine.runner import ModelThread
from hunyuan_service.errors import (
    DeadlineExceeded,
    InternalError,
    JobCancelled,
    OutOfMemory,
    ServiceError,
    Unavailable,
)
from hunyuan_service.models.base import InferenceModel, JobContext

logger = logging.getLogger(__name__)


class WorkerLoop:
    """Runs jobs one call at a time; the scheduler provides the state declared here."""

    model: InferenceModel
    counters: collections.Counter[str]
    produced: collections.Counter[str]  # images, completion_tokens, prompt_tokens
    final_statuses: collections.Counter[tuple[str, bool]]
    running: list[Job]
    max_batch_size: int
    batch_wait_s: float
    inference_seconds: Histogram
    queue_wait_seconds: Histogram
    batch_sizes: Histogram
    _queue: JobQueue
    _thread: ModelThread
    _observed_waiting: int
    _arrival: asyncio.Event
    _last_in_flight: int
    _avg_job_s: float | None

    if TYPE_CHECKING:

        def _queue_moved(self) -> None: ...

        def _set_idle_if_empty(self) -> None: ...

    async def _work(self) -> None:
        while True:
            head = await self._queue.get()
            self._observed_waiting -= head.observed
            batch = [head]
            try:
                if self.max_batch_size > 1:
                    batch += await self._companions(head)
                self._queue_moved()
                await self._run_batch(batch)
            except asyncio.CancelledError:
                for job in batch:
                    job.request_stop(StopReason.SHUTDOWN)
                    self._finish(job, JobStatus.FAILED, error=shutdown_error())
                raise
            except Exception:  # one batch's failure must never end the loop
                logger.exception("worker bookkeeping failed", extra=log_fields(head))
                for job in batch:
                    self._finish(job, JobStatus.FAILED, error=InternalError(generic_500(job)))
            finally:
                self.running = []
                self._set_idle_if_empty()

    async def _companions(self, head: Job) -> list[Job]:
        """Queued jobs that may run in one batch with `head`, oldest first (see `batching`)."""
        key = self.model.batch_key(head.payload)
        if key is None:
            return []
        taken = await gather_companions(
            self._queue,
            lambda job: not job.done.done() and self.model.batch_key(job.payload) == key,
            self.max_batch_size - 1,
            self.batch_wait_s,
            self._arrival,
            expected=self._last_in_flight - 1,
        )
        self._observed_waiting -= sum(job.observed for job in taken)
        return taken

    def _runnable(self, job: Job) -> bool:
        if job.done.done():
            # Ended while queued but not yet removed (a race with get); it never runs.
            self.counters["skipped_cancelled"] += 1
            return False
        if job.should_stop():
            self.counters["expired_queued"] += 1
            logger.info("deadline passed while queued", extra=log_fields(job))
            self._finish(job, JobStatus.EXPIRED, error=deadline_error(job))
            return False
        return True

    async def _run_batch(self, batch: list[Job]) -> None:
        jobs = [job for job in batch if self._runnable(job)]
        if not jobs:
            return
        self.running = jobs
        for job in jobs:
            job.mark_started()
            self.queue_wait_seconds.observe(job.started_at - job.enqueued_at)  # type: ignore[operator]
        self.batch_sizes.observe(len(jobs))
        started = time.monotonic()
        outcomes = await self._infer(jobs)
        finished = time.monotonic()
        # Clients served now, and those already waiting, are the companions to expect next.
        self._last_in_flight = len(jobs) + self._queue.qsize()
        for job, outcome in zip(jobs, outcomes, strict=True):
            job.finished_at = finished
            await self._settle(job, outcome)
        if any(job.status is JobStatus.SUCCEEDED for job in jobs):
            self._record_duration(finished - started)

    async def _infer(self, jobs: list[Job]) -> list[Any]:
        """One output or exception per job. A batch that runs out of memory is split in two."""
        contexts = [
            JobContext(
                job.should_stop, job.progress, job.token, job.stop_reason_value, job.observed
            )
            for job in jobs
        ]
        try:
            if len(jobs) == 1:
                return [await self._thread.run(self.model.infer, jobs[0].payload, contexts[0])]
            payloads = [job.payload for job in jobs]
            return list(await self._thread.run(self.model.infer_batch, payloads, contexts))
        except Exception as error:
            if len(jobs) > 1 and self.model.is_out_of_memory(error):
                self.counters["out_of_memory_batch_split"] += 1
                logger.warning("out of memory in a batch of %d; splitting it", len(jobs))
                await self._thread.run(self.model.recover_from_oom)
                half = len(jobs) // 2
                return await self._infer(jobs[:half]) + await self._infer(jobs[half:])
            return [error] * len(jobs)

    async def _settle(self, job: Job, outcome: Any) -> None:
        oom = isinstance(outcome, BaseException) and not isinstance(outcome, ServiceError)
        if oom and self.model.is_out_of_memory(outcome):
            await self._thread.run(self.model.recover_from_oom)
        self._settle_now(job, outcome)

    def _settle_now(self, job: Job, outcome: Any) -> None:
        """Gives `job` its final status from the model's `outcome` (output or exception)."""
        if isinstance(outcome, JobCancelled):
            reason = job.stop_reason or StopReason.CLIENT_GONE
            if reason is StopReason.SHUTDOWN and job.done.done():
                return  # ended, counted and logged by the drain's deadline
            self.counters[f"cancelled_running_{reason.value}"] += 1
            logger.info("running job stopped early", extra=log_fields(job, reason=reason.value))
            if reason is StopReason.DEADLINE:
                self._finish(job, JobStatus.EXPIRED, error=deadline_error(job))
            else:
                status = JobStatus.FAILED if reason is StopReason.SHUTDOWN else JobStatus.CANCELLED
                self._finish(
                    job, status, error=JobCancelled("the job was cancelled", code=reason.value)
                )
        elif isinstance(outcome, ServiceError) and 400 <= outcome.status_code < 500:
            # The model refused the input (e.g. too many tokens once templated): the client's
            # mistake, answered as such, not an "inference failed".
            self.counters["refused_by_model"] += 1
            logger.info("model refused the input: %s", outcome.message, extra=log_fields(job))
            self._finish(job, JobStatus.FAILED, error=outcome)
        elif isinstance(outcome, BaseException):
            if self.model.is_out_of_memory(outcome):
                self.counters["out_of_memory"] += 1
                logger.error("out of memory", extra=log_fields(job))
                error: ServiceError = OutOfMemory(
                    "the model ran out of accelerator memory for this request; "
                    "try a smaller size, fewer steps or fewer images"
                )
            else:
                self.counters["failed"] += 1
                logger.error("inference failed", exc_info=outcome, extra=log_fields(job))
                error = InternalError(generic_500(job))
            self._finish(job, JobStatus.FAILED, error=error)
        else:
            self.counters["completed"] += 1
            self._count_output(outcome)
            self.inference_seconds.observe(job.finished_at - job.started_at)  # type: ignore[operator]
            self._finish(job, JobStatus.SUCCEEDED, output=outcome)
            if logger.isEnabledFor(logging.INFO):
                logger.info("job done", extra=log_fields(job, **job.timings()))

    def _count_output(self, output: Any) -> None:
        images = getattr(output, "images", None)
        if images is not None:
            self.produced["images"] += len(images)
        for field in ("completion_tokens", "prompt_tokens"):
            value = getattr(output, field, None)
            if isinstance(value, int):
                self.produced[field] += value

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


def deadline_error(job: Job) -> DeadlineExceeded:
    """The 504 of a job whose deadline passed, naming the job's own budget."""
    return DeadlineExceeded(
        f"the request did not finish within its deadline ({job.budget_s:g} s); try fewer "
        "steps or a smaller size, or retry when the queue is shorter"
    )


def shutdown_error() -> Unavailable:
    """The 503 of a job the drain's deadline ended, or that was admitted too late to run."""
    return Unavailable(
        "the service is shutting down and its drain time (SHUTDOWN_TIMEOUT_S) ran out before "
        "this job finished; retry, another replica will take it",
        code="shutdown",
        retry_after_s=1,
    )


def generic_500(job: Job) -> str:
    return (
        f"internal error while running the model; see the server log for request {job.request_id}"
    )


def log_fields(job: Job, **fields: Any) -> dict[str, Any]:
    return {"request_id": job.request_id, **fields}

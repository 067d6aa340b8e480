"""The engine facade: load the model, admit jobs, hand out handles, drain and stop.

Every front-end (`/infer` as JSON, SSE or raw image, the OpenAI routes, the jobs API) submits
through `Engine.submit` and reads the `JobHandle` it returns; none touches the queue or a job's
internals. Nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from hunyuan_service import __version__
from hunyuan_service.engine.alarms import Alarms
from hunyuan_service.engine.events import Event, Heartbeat, Progress, Token
from hunyuan_service.engine.jobs import Job, JobStatus, StopReason
from hunyuan_service.engine.lifecycle import Lifecycle, State
from hunyuan_service.engine.scheduler import Reservation, Scheduler
from hunyuan_service.engine.store import JobStore
from hunyuan_service.errors import ServiceError, Unavailable
from hunyuan_service.models.base import InferenceModel
from hunyuan_service.models.compilations import compilations
from hunyuan_service.models.loading import describe_load_error
from hunyuan_service.settings import Settings

logger = logging.getLogger(__name__)

CPU_THREADS = 2  # the pool that decodes client images and encodes results
# A pool task running longer than this plus two whole URL fetches is stuck, not slow: image
# bytes, pixels and JPEG scans are bounded before decoding.
CPU_TASK_WEDGED_S = 90.0

T = TypeVar("T")


class JobHandle:
    """A submitted job as its submitter sees it: its events, its outcome, and `cancel`."""

    def __init__(self, scheduler: Scheduler, job: Job) -> None:
        self._scheduler = scheduler
        self._job = job

    @property
    def id(self) -> str:
        return self._job.id

    @property
    def request_id(self) -> str:
        return self._job.request_id

    @property
    def status(self) -> JobStatus:
        return self._job.status

    @property
    def error(self) -> ServiceError | None:
        return self._job.error

    @property
    def output(self) -> Any:
        return self._job.output

    @property
    def finished(self) -> bool:
        return self._job.done.done()

    @property
    def finished_at(self) -> float | None:
        return self._job.finished_at if self.finished else None

    def position(self) -> int | None:
        """0 while running, 1 for the next to run, None once finished."""
        return self._scheduler.position(self._job)

    def progress(self) -> Progress | None:
        """The latest progress event of a running text2image job."""
        return next((e for e in reversed(self._job.history) if isinstance(e, Progress)), None)

    def tokens(self) -> int:
        """How many token events an image2text job has produced so far."""
        return sum(isinstance(e, Token) for e in self._job.history)

    def events(
        self, after: int = 0, heartbeat_s: float | None = None
    ) -> AsyncIterator[tuple[int, Event | Heartbeat]]:
        """The job's numbered events from number `after + 1` on; see `Job.events`."""
        return self._job.events(after, heartbeat_s)

    async def result(self, disconnected: Callable[[], Awaitable[Any]] | None = None) -> Any:
        """The output, or the job's `ServiceError`; if the client leaves first, cancels the job.

        `disconnected()` makes an awaitable that completes when the client goes away.
        """
        return await self._scheduler.wait(self._job, disconnected)

    async def wait_finished(self) -> None:
        await asyncio.shield(self._job.done)

    def cancel(self, reason: StopReason = StopReason.USER) -> None:
        """Withdraws the job if queued, or stops it at its next step or token; no-op once ended."""
        if not self.finished:
            self._scheduler.cancel(self._job, reason)

    def forget_output(self) -> None:
        """Releases the model output once it has been rendered and stored elsewhere."""
        self._job.forget_output()

    def timings(self) -> dict[str, float]:
        return self._job.timings()


async def in_daemon_thread(function: Callable[[], T]) -> T:
    """Runs `function` on a new daemon thread and awaits its result.

    Loading can take minutes; on a daemon thread, a stop signal meanwhile ends the process
    without waiting for it (`asyncio.to_thread`'s pool threads are joined at exit).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def target() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (function(), None)
        except BaseException as error:  # handed to the awaiting task
            outcome = (None, error)
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name="hunyuan-load", daemon=True).start()
    return await future


class Engine:
    """Owns the model, the scheduler, the lifecycle state and the store of detached jobs.

    Args:
        settings: the configuration.
        model: a model instance to serve (tests pass fakes); built from the registry when None.
    """

    def __init__(self, settings: Settings, model: InferenceModel | None = None) -> None:
        self.settings = settings
        self.model = model
        self.lifecycle = Lifecycle()
        self.scheduler: Scheduler | None = None
        self.alarms = Alarms()  # coarse timers for every request: the body's, the wait's
        self.started_at = time.time()
        self.phase, self.phase_since = "waiting", time.monotonic()
        self.drain_deadline = float("inf")  # set when the drain begins
        self.compilations_at_ready: int | None = None  # torch.compile's count at /ready
        self._phase_logged_at = 0.0
        self.load_error: str | None = None  # one line, when start-up failed for a known reason
        # 4xx answers by (status, code), for /metrics: refused requests never become jobs.
        self.client_errors: collections.Counter[tuple[int, str]] = collections.Counter()
        # 503 answers by error code (queue_full, unavailable), and every answer by (method,
        # route template, status): what /metrics reports about requests, jobs or not.
        self.rejections: collections.Counter[str] = collections.Counter()
        self.http_requests: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self.jobs = JobStore(
            ttl_s=settings.job_result_ttl_s,
            max_jobs=settings.max_stored_jobs,
            max_bytes=settings.job_store_max_bytes,
        )
        # Decoding client images and encoding results run here, not on the event loop and not
        # on the model's thread, so they never delay a job.
        self.cpu_pool = ThreadPoolExecutor(
            max_workers=CPU_THREADS, thread_name_prefix="hunyuan-cpu"
        )
        self._cpu_running: dict[int, float] = {}  # task number -> when it started (monotonic)
        self._cpu_tasks = itertools.count()
        # Longer than any pool task may take: a whole URL fetch, then a bounded decode.
        self.cpu_task_wedged_s = CPU_TASK_WEDGED_S + 2 * settings.media_fetch_timeout_s

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Loads the model off the event loop, then starts the worker; raises if loading fails."""
        settings = self.settings
        if self.model is None:
            from hunyuan_service.models.registry import get_model

            self.model = get_model(settings)
        logger.info(
            "loading model",
            extra={"model_type": settings.model_type, "model_id": settings.model_id},
        )
        try:
            self._enter_phase("loading model")
            self.model.report = self._report_phase
            await in_daemon_thread(self.model.load)
            if settings.warmup:
                self._enter_phase("warming up " + ", ".join(settings.warmup))
                started = time.monotonic()
                await in_daemon_thread(self.model.warm_up)
                logger.info("warm-up took %.1f s", time.monotonic() - started)
        except Exception as error:
            self.lifecycle.advance(State.FAILED)
            self.load_error = describe_load_error(error, settings)
            if self.load_error is None:
                logger.exception("model failed to load; the service will not start")
            else:
                logger.error("cannot start: %s", self.load_error)
            raise
        self.scheduler = Scheduler(
            self.model,
            settings.max_queue_size,
            settings.request_timeout_s,
            self.lifecycle,
            max_batch_size=settings.max_batch_size,
            batch_wait_s=settings.batch_wait_ms / 1000,
            alarms=self.alarms,
        )
        self.scheduler.start()
        self.compilations_at_ready = compilations()
        info = self.model.info
        logger.info("ready", extra={"device": info.device, "dtype": info.dtype, "demo": info.demo})
        if info.demo:
            logger.warning("DEMO MODEL in use: tiny random weights; outputs are noise")

    def begin_drain(self) -> None:
        """Called on SIGTERM/SIGINT: /ready turns 503 and new requests are refused at once;
        admitted jobs get SHUTDOWN_TIMEOUT_S from now to finish (see `drain`)."""
        if self.lifecycle.begin_drain():
            self.drain_deadline = time.monotonic() + self.settings.shutdown_timeout_s
            logger.info("draining: no new requests; finishing admitted ones")

    async def drain(self) -> None:
        """Waits for admitted jobs until the drain's deadline, then ends those still queued or
        running with a 503 `shutdown`, so that each client gets an answer in the service's
        error shape before the server closes its connection. Safe to call more than once."""
        self.begin_drain()
        if self.scheduler is None:
            return
        remaining = max(self.drain_deadline - time.monotonic(), 0.0)
        if not await self.scheduler.drain(remaining):
            self.scheduler.end_for_shutdown()

    async def stop(self) -> None:
        """Drains (see `drain`), then stops the worker.

        The CPU pool stays up, so that results of the last jobs can still be encoded; `close`
        shuts it down.
        """
        await self.drain()
        if self.scheduler is not None:
            await self.scheduler.stop()
            logger.info("stopped", extra=dict(self.scheduler.counters))
        self.lifecycle.mark_stopped()

    def close(self) -> None:
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)

    def _enter_phase(self, phase: str) -> None:
        self.phase, self.phase_since = phase, time.monotonic()
        self._phase_logged_at = time.monotonic()
        logger.info("start-up: %s", phase)

    def _report_phase(self, phase: str) -> None:
        """What the loading thread reports; logged at most every 10 s while it repeats."""
        if phase.split(":")[0] != self.phase.split(":")[0]:
            self._enter_phase(phase)
            return
        self.phase = phase
        if time.monotonic() - self._phase_logged_at >= 10:
            self._phase_logged_at = time.monotonic()
            logger.info("start-up: %s", phase)

    def compilations_after_ready(self) -> int:
        """Compilations since the service turned ready: each one stalls every job meanwhile."""
        if self.compilations_at_ready is None:
            return 0
        return compilations() - self.compilations_at_ready

    @property
    def is_ready(self) -> bool:
        return self.state is State.READY

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def worker_alive(self) -> bool:
        return self.scheduler is not None and self.scheduler.worker_alive

    # -- admission ---------------------------------------------------------------------------

    def check_ready(self) -> Scheduler:
        """Refuses at once (503) while starting or draining, before any body is read."""
        if self.scheduler is None or self.lifecycle.state is not State.READY:
            state = self.lifecycle.state.value
            raise Unavailable(f"the service is {state}; retry shortly", retry_after_s=1)
        return self.scheduler

    def reserve(self) -> Reservation:
        """Holds a queue place while a request is prepared; see `Scheduler.reserve`."""
        return self.check_ready().reserve()

    def submit(
        self,
        payload: Any,
        request_id: str,
        *,
        timeout_s: float | None = None,
        reservation: Reservation | None = None,
        observed: bool = False,
        detached: bool = False,
        job_id: str | None = None,
    ) -> JobHandle:
        """The one way to run a job. Raises `QueueFull` or `Unavailable` when not admitted.

        Args:
            payload: the model's typed input.
            request_id: for logs and error bodies.
            timeout_s: a deadline shorter than REQUEST_TIMEOUT_S.
            reservation: a queue place taken earlier with `reserve`.
            observed: keep progress and token events (someone streams the job).
            detached: the job outlives its request: it gets an unguessable id and is kept in
                `jobs` until its result expires.
            job_id: a detached job's id given elsewhere (the shared job store keeps the job,
                not `jobs`).
        """
        scheduler = self.check_ready() if reservation is None else self.scheduler
        assert scheduler is not None
        kept = detached and job_id is None
        job_id = new_job_id() if kept else job_id
        job = scheduler.submit(
            payload,
            request_id,
            timeout_s=timeout_s,
            reservation=reservation,
            observed=observed or detached,
            job_id=job_id,
        )
        handle = JobHandle(scheduler, job)
        if kept:
            self.jobs.add(handle)
        return handle

    async def run_cpu(self, function: Callable[..., T], *args: Any) -> T:
        """Runs CPU-bound pre- or post-processing on the engine's own thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.cpu_pool, self._timed, function, args)

    def _timed(self, function: Callable[..., T], args: tuple[Any, ...]) -> T:
        """Runs on a pool thread, leaving a start time behind while it runs (see `cpu_pool`)."""
        number = next(self._cpu_tasks)
        self._cpu_running[number] = time.monotonic()
        try:
            return function(*args)
        finally:
            del self._cpu_running[number]

    def cpu_pool_state(self) -> dict[str, Any]:
        """How many pool tasks run, and for how long the oldest has: a task older than
        CPU_TASK_WEDGED_S means the pool is stuck (a blocking read, an endless decode)."""
        started = list(self._cpu_running.values())
        oldest = time.monotonic() - min(started) if started else 0.0
        return {
            "busy": len(started),
            "threads": CPU_THREADS,
            "oldest_task_s": round(oldest, 1),
            "wedged": oldest > self.cpu_task_wedged_s,
        }

    # -- observation -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        scheduler = self.scheduler
        state = self.lifecycle.state
        body: dict[str, Any] = {"status": state.value, "version": __version__}
        if state is State.STARTING:
            body.update(
                state="loading",
                phase=self.phase,
                phase_elapsed_s=round(time.monotonic() - self.phase_since, 1),
            )
        else:
            body["state"] = state.value
        if self.load_error is not None:
            body["error"] = self.load_error
        if self.model is not None:
            info = self.model.info
            body.update(
                model_type=info.model_type,
                model_id=info.model_id,
                demo=info.demo,
                device=info.device,
                dtype=info.dtype,
                **info.extra,
            )
            if info.demo:
                body["notice"] = "DEMO MODEL: tiny random weights; outputs are noise"
        body.update(
            worker_alive=self.worker_alive,
            queue_depth=scheduler.queue_depth if scheduler else 0,
            max_queue_size=self.settings.max_queue_size,
            busy=scheduler.busy if scheduler else False,
            cpu_pool=self.cpu_pool_state(),
        )
        return body


def new_job_id() -> str:
    """An unguessable job id: 144 random bits, URL-safe."""
    return "job_" + secrets.token_urlsafe(18)

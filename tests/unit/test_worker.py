"""The scheduler's mechanics with fake models: order, one-at-a-time, isolation, cancellation."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import pytest

from hunyuan_service.engine.events import Progress, Queued, Started, Succeeded
from hunyuan_service.engine.jobs import JobStatus, StopReason
from hunyuan_service.engine.scheduler import Scheduler
from hunyuan_service.errors import (
    DeadlineExceeded,
    InternalError,
    JobCancelled,
    OutOfMemory,
    QueueFull,
    Unavailable,
)
from tests.fakes import BlockingModel, FailingModel, FakeModel, SteppingModel


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


async def started(model: Any, max_queue_size: int = 4, timeout_s: float = 30.0) -> Scheduler:
    scheduler = Scheduler(model, max_queue_size=max_queue_size, request_timeout_s=timeout_s)
    scheduler.start()
    return scheduler


async def wait_until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


def test_jobs_run_in_arrival_order_one_at_a_time() -> None:
    async def scenario() -> None:
        model = SteppingModel(steps=2, step_s=0.005)
        scheduler = await started(model, max_queue_size=20)
        jobs = [scheduler.submit(i, f"r{i}") for i in range(15)]
        results = await asyncio.gather(*(scheduler.wait(job) for job in jobs))
        assert [r["echo"] for r in results] == list(range(15))
        assert model.calls == list(range(15))
        assert model.max_active == 1
        await scheduler.stop()

    run(scenario())


def test_overflow_raises_queue_full_with_retry_after() -> None:
    async def scenario() -> None:
        model = BlockingModel()
        scheduler = await started(model, max_queue_size=2)
        first = scheduler.submit("running", "r0")
        await wait_until(lambda: scheduler.busy)
        waiting = [scheduler.submit(i, f"r{i}") for i in (1, 2)]
        with pytest.raises(QueueFull) as caught:
            scheduler.submit("overflow", "r3")
        assert caught.value.status_code == 503
        assert int(caught.value.headers()["Retry-After"]) >= 1
        assert scheduler.counters["rejected_queue_full"] == 1
        model.release.set()
        await asyncio.gather(*(scheduler.wait(j) for j in [first, *waiting]))
        assert "overflow" not in model.calls
        await scheduler.stop()

    run(scenario())


def test_retry_after_grows_with_recent_job_durations() -> None:
    async def scenario() -> None:
        model = SteppingModel(steps=1, step_s=0.5)
        scheduler = await started(model)
        assert scheduler.retry_after_s(5) == 5  # no history yet: one second a job
        await scheduler.wait(scheduler.submit("a", "a"))
        per_job = scheduler._avg_job_s
        assert per_job is not None
        assert per_job >= 0.5
        assert scheduler.retry_after_s(1) == max(1, math.ceil(per_job))
        assert scheduler.retry_after_s(5) == math.ceil(per_job * 5)
        await scheduler.stop()

    run(scenario())


def test_model_exception_fails_only_its_own_job() -> None:
    async def scenario() -> None:
        model = FailingModel()
        scheduler = await started(model)
        jobs = [scheduler.submit(x, f"r{i}") for i, x in enumerate(["ok1", "boom", "ok2"])]
        outcomes = await asyncio.gather(*(scheduler.wait(j) for j in jobs), return_exceptions=True)
        assert outcomes[0] == {"echo": "ok1"}
        assert isinstance(outcomes[1], InternalError)
        assert "r1" in outcomes[1].message
        assert "exploded" not in outcomes[1].message  # no internals leak to the client
        assert outcomes[2] == {"echo": "ok2"}
        assert scheduler.worker_alive
        assert scheduler.counters["failed"] == 1
        await scheduler.stop()

    run(scenario())


def test_out_of_memory_is_reported_and_recovered() -> None:
    async def scenario() -> None:
        model = FailingModel()
        scheduler = await started(model)
        with pytest.raises(OutOfMemory, match="smaller size"):
            await scheduler.wait(scheduler.submit("oom", "r0"))
        assert model.oom_recoveries == 1
        assert await scheduler.wait(scheduler.submit("after", "r1")) == {"echo": "after"}
        assert scheduler.counters["out_of_memory"] == 1
        await scheduler.stop()

    run(scenario())


def test_cancelled_future_does_not_kill_the_worker() -> None:
    """The reference design's bug: set_result on a cancelled future raised and killed the loop."""

    async def scenario() -> None:
        model = BlockingModel()
        scheduler = await started(model)
        job = scheduler.submit("a", "r0")
        await wait_until(lambda: scheduler.busy)
        # As if the handler vanished: the job ends while the model still runs it.
        job.finish(JobStatus.CANCELLED, error=JobCancelled("gone"))
        model.release.set()
        await wait_until(lambda: not scheduler.busy)
        assert scheduler.worker_alive
        assert await scheduler.wait(scheduler.submit("b", "r1")) == {"echo": "b"}
        await scheduler.stop()

    run(scenario())


def test_disconnected_queued_job_never_runs_and_frees_its_place() -> None:
    async def scenario() -> None:
        model = BlockingModel()
        scheduler = await started(model, max_queue_size=1)
        running = scheduler.submit("running", "r0")
        await wait_until(lambda: scheduler.busy)
        gone = asyncio.get_running_loop().create_future()
        queued = scheduler.submit("abandoned", "r1")
        waiter = asyncio.ensure_future(scheduler.wait(queued, lambda: gone))
        await asyncio.sleep(0)
        gone.set_result(None)  # the client hangs up
        with pytest.raises(JobCancelled):
            await waiter
        assert scheduler.queue_depth == 0
        replacement = scheduler.submit("next", "r2")  # the place is free again at once
        model.release.set()
        await scheduler.wait(running)
        await scheduler.wait(replacement)
        assert model.calls == ["running", "next"]
        assert scheduler.counters["cancelled_queued_client_disconnected"] == 1
        await scheduler.stop()

    run(scenario())


def test_running_job_stops_within_a_step_when_client_leaves() -> None:
    async def scenario() -> None:
        model = SteppingModel(steps=200, step_s=0.01)
        scheduler = await started(model)
        gone = asyncio.get_running_loop().create_future()
        job = scheduler.submit("long", "r0")
        waiter = asyncio.ensure_future(scheduler.wait(job, lambda: gone))
        await wait_until(lambda: model.log.steps_run >= 3)
        gone.set_result(None)
        with pytest.raises(JobCancelled):
            await waiter
        steps_at_cancel = model.log.steps_run
        await wait_until(lambda: not scheduler.busy)
        assert model.log.steps_run <= steps_at_cancel + 1
        assert model.log.stopped_early == ["long"]
        assert scheduler.counters["cancelled_running_client_disconnected"] == 1
        await scheduler.stop()

    run(scenario())


def test_deadline_gives_504_and_stops_the_running_job() -> None:
    async def scenario() -> None:
        model = SteppingModel(steps=500, step_s=0.01)
        scheduler = await started(model, timeout_s=0.3)
        running = scheduler.submit("slow", "r0")
        queued = scheduler.submit("behind", "r1")
        results = await asyncio.gather(
            scheduler.wait(running), scheduler.wait(queued), return_exceptions=True
        )
        assert all(isinstance(r, DeadlineExceeded) for r in results)
        await wait_until(lambda: not scheduler.busy)
        assert model.log.steps_run < 250  # stopped long before its 500 steps (5 s), however slow
        assert "behind" not in model.calls  # its deadline passed while it waited
        await scheduler.stop()

    run(scenario())


def test_request_may_shorten_but_not_extend_its_deadline() -> None:
    async def scenario() -> None:
        scheduler = await started(FakeModel(), timeout_s=10)
        short = scheduler.submit("a", "r0", timeout_s=1)
        long = scheduler.submit("b", "r1", timeout_s=1000)
        assert short.deadline - short.enqueued_at == pytest.approx(1, abs=0.05)
        assert long.deadline - long.enqueued_at == pytest.approx(10, abs=0.05)
        await asyncio.gather(scheduler.wait(short), scheduler.wait(long))
        await scheduler.stop()

    run(scenario())


def test_observed_job_records_typed_events_in_order() -> None:
    async def scenario() -> None:
        scheduler = await started(SteppingModel(steps=5, step_s=0.001))
        job = scheduler.submit("a", "r0", observed=True)
        await scheduler.wait(job)
        # Progress hops to the loop before the result does, so the history is complete here.
        history = job.history
        assert history[:2] == [Queued(1), Started()]
        assert history[2:7] == [Progress(step, 5) for step in range(1, 6)]
        assert history[7] == Succeeded({"echo": "a"})
        assert len(history) == 8
        numbered = [number async for number, _ in job.events()]
        assert numbered == list(range(1, 9))
        assert [e for _, e in [x async for x in job.events(after=6)]] == history[6:]
        await scheduler.stop()

    run(scenario())


def test_drain_finishes_admitted_jobs_and_refuses_new_ones() -> None:
    async def scenario() -> None:
        model = SteppingModel(steps=5, step_s=0.01)
        scheduler = await started(model)
        jobs = [scheduler.submit(i, f"r{i}") for i in range(3)]
        waiters = [asyncio.ensure_future(scheduler.wait(j)) for j in jobs]
        assert await scheduler.drain(timeout_s=5) is True
        with pytest.raises(Unavailable):
            scheduler.submit("late", "late")
        assert [w.result()["echo"] for w in waiters] == [0, 1, 2]
        await scheduler.stop()

    run(scenario())


def test_dead_worker_refuses_requests_instead_of_hanging() -> None:
    async def scenario() -> None:
        scheduler = await started(FakeModel())
        assert scheduler._task is not None
        scheduler._task.cancel()  # simulate the worker dying
        await asyncio.gather(scheduler._task, return_exceptions=True)
        assert not scheduler.worker_alive
        with pytest.raises(Unavailable, match="restart"):
            scheduler.submit("a", "r0")

    run(scenario())


def test_stop_answers_jobs_still_queued() -> None:
    async def scenario() -> None:
        model = BlockingModel()
        scheduler = await started(model)
        running = scheduler.submit("a", "r0")
        await wait_until(lambda: scheduler.busy)
        queued = scheduler.submit("b", "r1")
        await scheduler.stop()
        await queued.done
        assert isinstance(queued.error, Unavailable)
        assert isinstance(running.error, Unavailable)
        assert running.stop_reason is StopReason.SHUTDOWN

    run(scenario())

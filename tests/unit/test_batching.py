"""Dynamic batching in the scheduler, with a fake batching model: FIFO, rows, OOM, events."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Any

import pytest

from hunyuan_service.engine.events import Progress
from hunyuan_service.engine.jobs import JobStatus, StopReason
from hunyuan_service.engine.scheduler import Scheduler
from hunyuan_service.errors import DeadlineExceeded, JobCancelled
from tests.fakes import BatchingModel
from tests.unit.test_worker import run, wait_until


def req(job_id: Any, key: Any = "a") -> dict[str, Any]:
    return {"id": job_id, "key": key}


async def started(model: BatchingModel, batch: int, wait_s: float = 0.0) -> Scheduler:
    scheduler = Scheduler(
        model, max_queue_size=32, request_timeout_s=60, max_batch_size=batch, batch_wait_s=wait_s
    )
    scheduler.start()
    return scheduler


async def blocked_head(model: BatchingModel, scheduler: Scheduler) -> Any:
    """Submits a job that holds the worker until `model.release` is set."""
    model.release.clear()
    head = scheduler.submit(req("head", key=None), "head")
    await wait_until(lambda: model.started.is_set())
    return head


def test_batch_size_one_runs_each_job_alone_in_order() -> None:
    async def scenario() -> None:
        model = BatchingModel()
        scheduler = await started(model, batch=1)
        jobs = [scheduler.submit(req(i), f"r{i}") for i in range(5)]
        await asyncio.gather(*(scheduler.wait(job) for job in jobs))
        assert model.batches == [[i] for i in range(5)]
        await scheduler.stop()

    run(scenario())


def test_compatible_jobs_from_the_head_run_together_up_to_the_batch_size() -> None:
    async def scenario() -> None:
        model = BatchingModel()
        scheduler = await started(model, batch=4)
        head = await blocked_head(model, scheduler)
        jobs = [scheduler.submit(req(i), f"r{i}") for i in range(6)]
        model.release.set()
        results = await asyncio.gather(*(scheduler.wait(job) for job in [head, *jobs]))
        assert model.batches == [["head"], [0, 1, 2, 3], [4, 5]]
        assert [r["echo"] for r in results] == ["head", 0, 1, 2, 3, 4, 5]
        assert scheduler.batch_sizes.total == 3
        await scheduler.stop()

    run(scenario())


def test_a_later_job_joins_the_heads_batch_but_never_jumps_an_earlier_batch() -> None:
    async def scenario() -> None:
        model = BatchingModel()
        scheduler = await started(model, batch=4)
        head = await blocked_head(model, scheduler)
        order = [("a1", "a"), ("b1", "b"), ("a2", "a"), ("solo", None), ("b2", "b"), ("a3", "a")]
        jobs = [scheduler.submit(req(name, key), name) for name, key in order]
        model.release.set()
        await asyncio.gather(*(scheduler.wait(job) for job in [head, *jobs]))
        # a1 heads the first batch and takes a2, a3; b1 is next and takes b2; "solo" waits
        # behind b1 because it arrived after it, and never batches.
        assert model.batches == [["head"], ["a1", "a2", "a3"], ["b1", "b2"], ["solo"]]
        await scheduler.stop()

    run(scenario())


def test_the_worker_waits_for_companions_only_after_a_larger_batch() -> None:
    async def scenario() -> None:
        model = BatchingModel()
        scheduler = await started(model, batch=2, wait_s=600)  # a wait for nobody would hang
        # A lone client never waits: one job was in flight last time, so none is expected.
        await asyncio.wait_for(scheduler.wait(scheduler.submit(req("lone"), "lone")), 60)
        # Two in flight come back together: after a batch of two, the worker waits for both.
        first, second = scheduler.submit(req("a"), "a"), scheduler.submit(req("b"), "b")
        await asyncio.gather(scheduler.wait(first), scheduler.wait(second))
        x = scheduler.submit(req("x"), "x")
        await wait_until(lambda: scheduler.queue_depth == 0)  # the worker took x and waits
        y = scheduler.submit(req("y"), "y")
        await asyncio.gather(scheduler.wait(x), scheduler.wait(y))
        assert model.batches == [["lone"], ["a", "b"], ["x", "y"]]
        await scheduler.stop()

    run(scenario())


def test_a_cancelled_row_stops_counting_while_its_neighbours_finish() -> None:
    async def scenario() -> None:
        model = BatchingModel()
        model.gates[0] = threading.Event()  # the batch of rows 0-2 waits here, mid-run
        scheduler = await started(model, batch=3)
        head = await blocked_head(model, scheduler)
        jobs = [scheduler.submit(req(i), f"r{i}", observed=True) for i in range(3)]
        model.release.set()
        await wait_until(lambda: model.running_ids == [0, 1, 2])
        scheduler.cancel(jobs[1], StopReason.CLIENT_GONE)
        assert jobs[1].status is JobStatus.CANCELLED  # its client hears at once
        model.gates[0].set()
        outcomes = await asyncio.gather(
            *(scheduler.wait(job) for job in [head, *jobs]), return_exceptions=True
        )
        assert isinstance(outcomes[2], JobCancelled)
        assert [outcomes[1]["echo"], outcomes[3]["echo"]] == [0, 2]
        assert model.stopped_rows == [1]
        assert scheduler.counters["cancelled_running_client_disconnected"] == 1
        await scheduler.stop()

    run(scenario())


def test_each_row_gets_only_its_own_progress_events() -> None:
    async def scenario() -> None:
        model = BatchingModel(steps=4)
        scheduler = await started(model, batch=3)
        head = await blocked_head(model, scheduler)
        jobs = [scheduler.submit(req(i), f"r{i}", observed=True) for i in range(3)]
        model.release.set()
        await asyncio.gather(*(scheduler.wait(job) for job in [head, *jobs]))
        for row, job in enumerate(jobs):
            progress = [e for e in job.history if isinstance(e, Progress)]
            assert progress == [Progress(step, 100 + row) for step in range(1, 5)]
        await scheduler.stop()

    run(scenario())


def test_out_of_memory_splits_the_batch_before_failing_anyone() -> None:
    async def scenario() -> None:
        model = BatchingModel(oom_above=2)
        scheduler = await started(model, batch=4)
        head = await blocked_head(model, scheduler)
        jobs = [scheduler.submit(req(i), f"r{i}") for i in range(4)]
        model.release.set()
        results = await asyncio.gather(*(scheduler.wait(job) for job in [head, *jobs]))
        assert [r["echo"] for r in results[1:]] == [0, 1, 2, 3]
        assert model.batches == [["head"], [0, 1], [2, 3]]
        assert scheduler.counters["out_of_memory_batch_split"] == 1
        assert model.oom_recoveries == 1
        await scheduler.stop()

    run(scenario())


def test_out_of_memory_of_a_single_row_fails_only_that_job() -> None:
    async def scenario() -> None:
        model = BatchingModel(oom_above=0)
        scheduler = await started(model, batch=4)
        job = scheduler.submit(req("big"), "big")
        with pytest.raises(Exception, match="ran out of accelerator memory"):
            await scheduler.wait(job)
        assert scheduler.counters["out_of_memory"] == 1
        assert scheduler.worker_alive
        await scheduler.stop()

    run(scenario())


def test_retry_after_counts_batches_not_jobs() -> None:
    async def scenario() -> None:
        model = BatchingModel(steps=1, step_s=0.2)
        scheduler = await started(model, batch=4)
        await scheduler.wait(scheduler.submit(req("x"), "x"))
        per_run = scheduler._avg_job_s
        assert per_run is not None
        assert scheduler.retry_after_s(8) == max(1, math.ceil(per_run * 2))
        assert scheduler.retry_after_s(9) == max(1, math.ceil(per_run * 3))
        await scheduler.stop()

    run(scenario())


def test_a_model_that_cannot_batch_runs_alone_whatever_the_setting() -> None:
    async def scenario() -> None:
        from tests.fakes import SteppingModel

        model = SteppingModel(steps=1)
        scheduler = Scheduler(model, max_queue_size=8, request_timeout_s=60, max_batch_size=8)
        assert scheduler.max_batch_size == 1
        scheduler.start()
        await scheduler.wait(scheduler.submit("a", "a"))
        await scheduler.stop()

    run(scenario())


def test_a_deadline_that_passes_inside_a_batch_ends_only_its_row() -> None:
    async def scenario() -> None:
        model = BatchingModel()
        model.gates[0] = threading.Event()  # the batch of rows 0-2 waits here, mid-run
        scheduler = await started(model, batch=3)
        head = await blocked_head(model, scheduler)
        jobs = [scheduler.submit(req(i), f"r{i}", timeout_s=600) for i in range(3)]
        model.release.set()
        await wait_until(lambda: model.running_ids == [0, 1, 2])
        jobs[1].deadline = time.monotonic()  # row 1's time runs out while the batch runs
        model.gates[0].set()
        outcomes = await asyncio.gather(
            *(scheduler.wait(job) for job in [head, *jobs]), return_exceptions=True
        )
        assert isinstance(outcomes[2], DeadlineExceeded)
        assert jobs[1].status is JobStatus.EXPIRED
        assert [outcomes[1]["echo"], outcomes[3]["echo"]] == [0, 2]
        assert [jobs[0].status, jobs[2].status] == [JobStatus.SUCCEEDED] * 2
        assert model.stopped_rows == [1]
        assert scheduler.counters["cancelled_running_deadline"] == 1
        await scheduler.stop()

    run(scenario())

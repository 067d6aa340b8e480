"""The engine's pieces with fakes: lifecycle transitions, the job store, handles and deadlines."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hunyuan_service.engine.engine import Engine
from hunyuan_service.engine.events import Failed, Progress, Queued, Started, Succeeded
from hunyuan_service.engine.jobs import JobStatus
from hunyuan_service.engine.lifecycle import Lifecycle, State
from hunyuan_service.errors import DeadlineExceeded, NotFound, Unavailable
from tests.fakes import BlockingModel, SteppingModel, fake_settings


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_lifecycle_allows_only_its_transitions() -> None:
    life = Lifecycle()
    with pytest.raises(AssertionError, match="starting -> "):
        life.advance(State.STOPPED)
    life.advance(State.READY)
    assert life.accepting
    assert life.begin_drain() is True
    assert life.begin_drain() is False  # a second stop signal changes nothing
    assert not life.accepting
    with pytest.raises(AssertionError):
        life.advance(State.READY)
    life.mark_stopped()
    assert life.state is State.STOPPED


def test_a_stop_signal_during_loading_keeps_the_service_from_turning_ready() -> None:
    async def scenario() -> None:
        engine = Engine(fake_settings(), SteppingModel())
        engine.begin_drain()  # SIGTERM while the model loads
        await engine.start()
        assert engine.state is State.DRAINING
        with pytest.raises(Unavailable):
            engine.submit("x", "r0")
        await engine.stop()
        assert engine.state is State.STOPPED

    run(scenario())


def test_unobserved_jobs_keep_no_progress_events() -> None:
    async def scenario() -> None:
        engine = Engine(fake_settings(), SteppingModel(steps=5, step_s=0.001))
        await engine.start()
        plain = engine.submit("plain", "r0")
        watched = engine.submit("watched", "r1", observed=True)
        await plain.result()
        await watched.result()
        # Nobody streams a plain request: only its final event is kept.
        assert [type(e) for _, e in [x async for x in plain.events()]] == [Succeeded]
        events = [e for _, e in [x async for x in watched.events()]]
        assert events[:3] == [Queued(2), Queued(1), Started()]  # it moved up when r0 started
        assert [type(e) for e in events[3:]] == [Progress] * 5 + [Succeeded]
        await engine.stop()

    run(scenario())


def test_deadline_ends_a_job_that_nobody_waits_for() -> None:
    async def scenario() -> None:
        model = BlockingModel()
        engine = Engine(fake_settings(request_timeout_s=0.2), model)
        await engine.start()
        running = engine.submit("running", "r0", detached=True)
        queued = engine.submit("queued", "r1", detached=True)
        await running.wait_finished()
        await queued.wait_finished()
        assert (running.status, queued.status) == (JobStatus.EXPIRED, JobStatus.EXPIRED)
        assert isinstance(queued.error, DeadlineExceeded)
        assert model.calls == ["running"]  # the queued one never ran
        last = [e async for _, e in queued.events()][-1]
        assert isinstance(last, Failed)
        await engine.stop()

    run(scenario())


def test_store_evicts_oldest_finished_first_and_never_an_unfinished_job() -> None:
    async def scenario() -> None:
        model = BlockingModel()
        engine = Engine(fake_settings(max_stored_jobs=2, max_queue_size=8), model)
        await engine.start()
        handles = [engine.submit(f"j{i}", f"r{i}", detached=True) for i in range(3)]
        # Three unfinished jobs and room for two: none may go, so the store runs over.
        assert len(engine.jobs) == 3
        model.release.set()
        for handle in handles:
            await handle.wait_finished()
        engine.submit("j3", "r3", detached=True)
        assert len(engine.jobs) == 2
        for gone in handles[:2]:
            with pytest.raises(NotFound, match="evicted"):
                engine.jobs.get(gone.id)
        assert engine.jobs.get(handles[2].id).handle is handles[2]
        await engine.stop()

    run(scenario())


def test_store_byte_cap_evicts_results() -> None:
    async def scenario() -> None:
        engine = Engine(fake_settings(job_store_max_bytes=100), SteppingModel(steps=1))
        await engine.start()
        first = engine.submit("a", "r0", detached=True)
        await first.wait_finished()
        engine.jobs.set_size(engine.jobs.get(first.id), 80)
        second = engine.submit("b", "r1", detached=True)
        await second.wait_finished()
        engine.jobs.set_size(engine.jobs.get(second.id), 80)  # 160 > 100: the oldest goes
        with pytest.raises(NotFound, match="JOB_STORE_MAX_BYTES=100"):
            engine.jobs.get(first.id)
        assert engine.jobs.bytes == 80
        await engine.stop()

    run(scenario())


def test_job_ids_are_unguessable_and_distinct() -> None:
    async def scenario() -> None:
        engine = Engine(fake_settings(max_queue_size=64), SteppingModel(steps=1))
        await engine.start()
        ids = {engine.submit(i, f"r{i}", detached=True).id for i in range(50)}
        assert len(ids) == 50
        assert all(job_id.startswith("job_") and len(job_id) == 4 + 24 for job_id in ids)
        await engine.stop()

    run(scenario())


def test_cancellations_are_read_from_the_job_counters() -> None:
    from hunyuan_service.engine.metrics import _cancellations

    counters = {
        "cancelled_queued_client_disconnected": 2,
        "cancelled_running_client_disconnected": 1,
        "cancelled_running_cancelled_by_user": 3,
        "expired_queued": 4,
        "completed": 9,
    }
    assert _cancellations(counters) == {
        ("client_disconnected", "queued"): 2,
        ("client_disconnected", "running"): 1,
        ("cancelled_by_user", "running"): 3,
        ("deadline", "queued"): 4,
    }


def test_jobs_still_running_at_the_drain_deadline_end_with_a_503_shutdown() -> None:
    async def scenario() -> None:
        model = BlockingModel()  # never released: the job outlives any drain
        engine = Engine(fake_settings(shutdown_timeout_s=0.2), model)
        await engine.start()
        running = engine.submit("running", "r0", detached=True)
        queued = engine.submit("queued", "r1", detached=True)
        reserved = engine.reserve()  # a request still decoding its images
        await asyncio.to_thread(model.started.wait, 30)
        await engine.stop()
        for handle in (running, queued):
            assert handle.status is JobStatus.FAILED
            assert isinstance(handle.error, Unavailable)
            assert (handle.error.code, handle.error.status_code) == ("shutdown", 503)
            assert handle.error.headers() == {"Retry-After": "1"}
        assert model.calls == ["running"]  # the queued one never ran
        with pytest.raises(Unavailable, match="shutting down") as refused:
            engine.submit("late", "r2", reservation=reserved)
        assert refused.value.code == "shutdown"
        counters = engine.scheduler.counters
        assert counters["cancelled_running_shutdown"] == counters["cancelled_queued_shutdown"] == 1

    run(scenario())


def test_jobs_that_finish_within_the_drain_are_not_touched() -> None:
    async def scenario() -> None:
        engine = Engine(fake_settings(shutdown_timeout_s=60), SteppingModel(steps=3))
        await engine.start()
        handles = [engine.submit(f"job{i}", f"r{i}", detached=True) for i in range(3)]
        await engine.stop()
        assert [h.status for h in handles] == [JobStatus.SUCCEEDED] * 3

    run(scenario())


def test_the_tensor_cache_keeps_the_most_recently_used_under_its_byte_cap() -> None:
    import torch

    from hunyuan_service.models.caches import TensorCache

    cache = TensorCache(max_bytes=3 * 400)
    for name in ("a", "b", "c"):
        cache.put(name, torch.zeros(100))  # 400 bytes each
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("d", (torch.zeros(50), torch.zeros(50)))  # a pair counts both: 400 bytes
    assert cache.get("b") is None  # the least recently used went
    assert [cache.get(k) is not None for k in ("a", "c", "d")] == [True, True, True]
    assert cache.bytes == 1200
    cache.put("huge", torch.zeros(1000))  # larger than the cap: not kept, nothing evicted
    assert cache.get("huge") is None
    assert len(cache) == 3
    assert cache.stats() == {
        "hits": 4,
        "misses": 2,
        "evictions": 1,
        "bytes": 1200,
        "entries": 3,
    }
    off = TensorCache(max_bytes=0)
    off.put("a", torch.zeros(1))
    assert off.get("a") is None

"""Events the model thread reports reach the event loop in order, a burst in one hop, and before
anything the thread hands over after them."""

from __future__ import annotations

import asyncio
import functools
import math
import threading
from collections.abc import Callable
from typing import Any

import pytest

from hunyuan_service.engine.events import Progress, Token
from hunyuan_service.engine.jobs import EventRelay, Job


def job(name: str, relay: EventRelay, observed: bool = True) -> Job:
    return Job(
        id=name,
        request_id=name,
        payload=None,
        deadline=math.inf,
        budget_s=60,
        done=relay.loop.create_future(),
        relay=relay,
        observed=observed,
    )


def on_model_thread(work: Callable[[], None]) -> None:
    """Runs `work` on another thread and waits for it without yielding: the loop runs none of
    the callbacks it schedules until the caller awaits."""
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()


def counting_hops(loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    hops: list[Any] = []
    original = loop.call_soon_threadsafe

    def counted(callback: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(callback)
        return original(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    return hops


def test_a_steps_events_for_every_row_take_one_hop_in_order_before_the_outcome(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        relay = EventRelay(loop)
        rows = [job(f"row{i}", relay) for i in range(4)]
        unobserved = job("plain", relay, observed=False)
        hops = counting_hops(loop, monkeypatch)
        recorded_at_outcome: list[int] = []

        def outcome() -> None:
            recorded_at_outcome.append(sum(len(row.history) for row in rows))

        def decode() -> None:
            for step in range(25):
                for row in rows:
                    row.token(f"{row.id}:{step}")
                unobserved.token("not kept")
            rows[0].progress(1, 2)
            loop.call_soon_threadsafe(outcome)  # as the model thread hands over a result

        on_model_thread(decode)
        await asyncio.sleep(0)
        for row in rows:
            expected: list[Any] = [Token(f"{row.id}:{step}") for step in range(25)]
            if row is rows[0]:
                expected.append(Progress(1, 2))
            assert row.history == expected
        assert unobserved.history == []
        assert recorded_at_outcome == [101]  # every event was recorded before the outcome
        assert len(hops) == 2  # one delivery for the 101 events, then the outcome

    asyncio.run(asyncio.wait_for(scenario(), timeout=20))


def test_events_after_a_delivery_schedule_the_next_one(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        relay = EventRelay(loop)
        row = job("row", relay)
        hops = counting_hops(loop, monkeypatch)
        for step in range(3):
            on_model_thread(functools.partial(row.token, str(step)))
            await asyncio.sleep(0)
            assert row.history == [Token(str(n)) for n in range(step + 1)]
        assert len(hops) == 3

    asyncio.run(asyncio.wait_for(scenario(), timeout=20))

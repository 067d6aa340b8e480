"""The request path's coarse timers: due alarms fire, disarmed ones never do, on any loop."""

from __future__ import annotations

import asyncio

from hunyuan_service.engine.alarms import Alarms

HANG_S = 30  # a bound that only a hang reaches


def test_a_due_alarm_fires_and_a_disarmed_one_never_does() -> None:
    async def scenario() -> list[str]:
        alarms, fired = Alarms(tick_s=0.01), []
        done = asyncio.Event()
        kept = alarms.arm(0.0, lambda: fired.append("kept"))
        dropped = alarms.arm(0.0, lambda: fired.append("dropped"))
        alarms.arm(0.0, done.set)
        alarms.disarm(dropped)
        await asyncio.wait_for(done.wait(), HANG_S)
        alarms.disarm(kept)  # after firing: a no-op
        assert len(alarms) == 0  # nothing left armed, so the sweep stops
        return fired

    assert asyncio.run(scenario()) == ["kept"]


def test_a_later_alarm_waits_for_its_time() -> None:
    async def scenario() -> tuple[list[str], int]:
        alarms, fired = Alarms(tick_s=0.01), []
        early = asyncio.Event()
        alarms.arm(3600.0, lambda: fired.append("an hour"))
        alarms.arm(0.0, early.set)
        await asyncio.wait_for(early.wait(), HANG_S)
        return fired, len(alarms)

    fired, armed = asyncio.run(scenario())
    assert fired == []  # the hour-long one has not fired
    assert armed == 1  # and is still armed


def test_a_failing_callback_does_not_stop_the_others() -> None:
    async def scenario() -> None:
        alarms = Alarms(tick_s=0.01)
        done = asyncio.Event()

        def fail() -> None:
            raise RuntimeError("boom")

        alarms.arm(0.0, fail)
        alarms.arm(0.0, done.set)
        await asyncio.wait_for(done.wait(), HANG_S)

    asyncio.run(scenario())


def test_the_same_alarms_serve_a_new_event_loop() -> None:
    """An app's engine outlives a test client's loop; the next loop must get its own sweep."""
    alarms = Alarms(tick_s=0.01)

    async def one_round() -> None:
        done = asyncio.Event()
        alarms.arm(3600.0, lambda: None)  # keeps the old loop's sweep pending when it closes
        alarms.arm(0.0, done.set)
        await asyncio.wait_for(done.wait(), HANG_S)

    asyncio.run(one_round())
    asyncio.run(one_round())

"""Coarse timers for the request path, swept together by one loop timer.

Each request arms two timers that almost never fire: the body's read deadline and the point
where a waiting request starts to watch for its client's disconnect. `loop.call_later` costs a
timer handle, a heap push and a cancel for each; here arming and disarming are one dict write,
and a single loop timer runs every `tick_s` while any alarm is armed (none while idle). An alarm
fires between 0 and `tick_s` after its time, so only deadlines that tolerate that use it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

TICK_S = 0.025


class Alarms:
    """Callbacks due after a delay, fired by a shared sweep on the running event loop."""

    def __init__(self, tick_s: float = TICK_S) -> None:
        self.tick_s = tick_s
        self._armed: dict[int, tuple[float, Callable[[], object]]] = {}
        self._keys = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def arm(self, delay_s: float, callback: Callable[[], object]) -> int:
        """Calls `callback` on this loop once `delay_s` has passed; returns the key to disarm."""
        key = next(self._keys)
        self._armed[key] = (time.monotonic() + delay_s, callback)
        loop = asyncio.get_running_loop()
        if self._timer is None or self._loop is not loop:  # a new loop: the old timer is gone
            self._loop = loop
            self._timer = loop.call_later(self.tick_s, self._sweep)
        return key

    def disarm(self, key: int) -> None:
        self._armed.pop(key, None)

    def __len__(self) -> int:
        return len(self._armed)

    def _sweep(self) -> None:
        self._timer = None
        now = time.monotonic()
        for key in [key for key, (due, _) in self._armed.items() if due <= now]:
            entry = self._armed.pop(key, None)
            if entry is None:  # disarmed by an earlier callback of this sweep
                continue
            try:
                entry[1]()
            except Exception:  # one failing callback must not stop the others
                logger.exception("alarm callback failed")
        if self._armed and self._loop is not None and not self._loop.is_closed():
            self._timer = self._loop.call_later(self.tick_s, self._sweep)

"""Forming a batch from the head of the queue: compatible jobs join the head, none jumps it.

The head job always runs in the next batch. Later jobs that the model says are compatible (the
same `batch_key`) join it, oldest first, up to the batch size; incompatible jobs keep their
places. When nothing else waits, the worker may wait up to BATCH_WAIT_MS for companions, but
only while it has gathered fewer jobs than were in flight (running or queued) when the last
batch ended: clients served then come back soon, and a lone client never waits at all. It never
waits while other jobs are queued, so a wait cannot delay an earlier job.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hunyuan_service.engine.jobs import Job, JobQueue


async def gather_companions(
    queue: JobQueue,
    compatible: Callable[[Job], bool],
    limit: int,
    wait_s: float,
    arrival: asyncio.Event,
    expected: int = 0,
) -> list[Job]:
    """Removes and returns up to `limit` compatible jobs from `queue`, in queue order.

    It waits for more (up to `wait_s`) only while fewer than `expected` companions are taken.
    """
    taken: list[Job] = []
    deadline = time.monotonic() + wait_s
    while True:
        for job in list(queue.waiting()):
            if len(taken) >= limit:
                break
            if compatible(job):
                queue.discard(job)
                taken.append(job)
        remaining = deadline - time.monotonic()
        if len(taken) >= min(limit, expected) or remaining <= 0 or queue.qsize():
            return taken
        arrival.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(arrival.wait(), timeout=remaining)

"""Detached jobs kept by id: finished results expire after a TTL, and a count and byte cap apply.

One process, in memory: a restart loses every stored result. Only finished jobs are ever evicted,
oldest first; a queued or running job stays until it ends. The byte cap counts what the
front-end stored (`set_size`), which releases the model's own output once it has rendered it.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hunyuan_service.errors import NotFound

if TYPE_CHECKING:
    from hunyuan_service.engine.engine import JobHandle

# How many evicted ids are remembered, so that their 404 can say why they are gone.
FORGOTTEN_IDS_KEPT = 10_000
MAX_SHOWN_ID = 64  # a real id is 28 characters


def shown_id(job_id: str) -> str:
    """A job id as an error message shows it: whole up to MAX_SHOWN_ID characters, else its start
    and its length, so that a client's 5,000-character id is not echoed back whole."""
    if len(job_id) <= MAX_SHOWN_ID:
        return job_id
    return f"{job_id[: MAX_SHOWN_ID // 2]}... ({len(job_id)} characters)"


@dataclass(eq=False)
class StoredJob:
    """A detached job and what its front-end made of its result (`rendered`, `size` bytes)."""

    handle: JobHandle
    rendered: Any = None
    size: int = 0
    created_at: float = field(default_factory=time.time)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set once `rendered` is final

    def expired(self, now: float, ttl_s: float) -> bool:
        finished_at = self.handle.finished_at
        return finished_at is not None and now - finished_at > ttl_s


class JobStore:
    """Detached jobs by id, bounded by `max_jobs` entries and `max_bytes` of stored results."""

    def __init__(self, ttl_s: float, max_jobs: int, max_bytes: int) -> None:
        self.ttl_s, self.max_jobs, self.max_bytes = ttl_s, max_jobs, max_bytes
        self._jobs: collections.OrderedDict[str, StoredJob] = collections.OrderedDict()
        self._gone: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.bytes = 0
        self.evictions: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, handle: JobHandle) -> StoredJob:
        entry = StoredJob(handle)
        self._jobs[handle.id] = entry
        self._enforce()
        return entry

    def get(self, job_id: str) -> StoredJob:
        """The stored job, or a 404 that says whether it expired, was evicted or never existed."""
        self._enforce()
        entry = self._jobs.get(job_id)
        if entry is not None:
            return entry
        why = self._gone.get(job_id)
        if why == "expired":
            raise NotFound(
                f"job {shown_id(job_id)} has expired: results are kept "
                f"JOB_RESULT_TTL_S={self.ttl_s:g} s after the job ends",
                code="job_expired",
            )
        if why == "evicted":
            raise NotFound(
                f"job {shown_id(job_id)} was evicted to make room: the store keeps at most "
                f"MAX_STORED_JOBS={self.max_jobs} jobs and JOB_STORE_MAX_BYTES={self.max_bytes} "
                "bytes of results, oldest finished first",
                code="job_evicted",
            )
        raise NotFound(
            f"no job {shown_id(job_id)}: the id is unknown to this server", code="job_not_found"
        )

    def set_size(self, entry: StoredJob, size: int) -> None:
        """Records the bytes a finished job's result occupies, and evicts to stay under the cap."""
        if entry.handle.id in self._jobs:
            self.bytes += size - entry.size
            entry.size = size
            self._enforce()

    def _enforce(self) -> None:
        now = time.monotonic()
        for job_id, entry in list(self._jobs.items()):
            if entry.expired(now, self.ttl_s):
                self._forget(job_id, "expired")
        finished = (job_id for job_id, entry in list(self._jobs.items()) if entry.handle.finished)
        while len(self._jobs) > self.max_jobs or self.bytes > self.max_bytes:
            oldest = next(finished, None)
            if oldest is None:
                break  # only unfinished jobs are left; they stay until they end
            self._forget(oldest, "evicted")

    def _forget(self, job_id: str, why: str) -> None:
        entry = self._jobs.pop(job_id)
        self.bytes -= entry.size
        self.evictions[why] += 1
        self._gone[job_id] = why
        while len(self._gone) > FORGOTTEN_IDS_KEPT:
            self._gone.popitem(last=False)

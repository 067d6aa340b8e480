"""The jobs API's records, events and queue on Redis, shared by every replica (JOB_STORE_URL).

Keys, all under JOB_STORE_PREFIX (`P`):

- `P job:<id>`: a hash, the job's record: status, the request as sent (until the job ends),
  owner replica, wall-clock stamps, and at the end the rendered result or the error.
- `P events:<id>`: a stream of the job's events with ids `0-1`, `0-2`, ... so that the event's
  number (the SSE id) is its stream id, and `Last-Event-ID: n` resumes with `XREAD ... 0-n`.
- `P queue`: a list of queued ids, oldest first. A replica with room moves the head onto its
  own `P claimed:<replica>` list (BLMOVE), so a job is always in exactly one list until it runs.
- `P alive:<replica>`: the replica's lease, renewed every heartbeat, expiring after three. A
  replica whose lease lapsed is reaped by whichever live replica sees it first: the jobs it only
  claimed go back to the head of the queue, the ones it ran end `failed` with `replica_lost`.
- `P finished`: finished ids scored by when they ended, for the TTL, the count and byte caps.
- `P bytes`: bytes of results stored; `P gone:<id>`: why an id is gone (expired or evicted).
- channel `P cancel`: ids whose running job should stop, on whichever replica runs it.

Every change of a job's status is one Lua script, so two replicas never both finish, reap or
cancel the same job: exactly one of them gets to deliver its webhook. The scripts name keys
built from the prefix, which a single Redis (or one with replicas) allows, and Redis Cluster
does not.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

FINAL_STATUSES = ("succeeded", "failed", "cancelled", "expired")
GONE_KEPT_S = 86_400  # how long an expired or evicted id's 404 can still say why

_ENQUEUE = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then return -1 end
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('RPUSH', KEYS[1], ARGV[2])
local n = redis.call('LLEN', KEYS[1])
redis.call('XADD', KEYS[3], '0-*', 'kind', 'queued', 'data', '{"position":' .. n .. '}')
return n
"""

# A claimed job is the claimer's; a record that is gone (expired meanwhile) is dropped.
_OWN = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('LREM', KEYS[2], 1, ARGV[1])
  return 0
end
redis.call('HSET', KEYS[1], 'owner', ARGV[2])
return 1
"""

# A claimed job this replica cannot take after all goes back to the head of the queue.
_GIVE_BACK = """
if redis.call('LREM', KEYS[2], 1, ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[1], 'owner')
  redis.call('LPUSH', KEYS[3], ARGV[1])
  return 1
end
return 0
"""

_START = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1]
    or redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[2])
redis.call('XADD', KEYS[2], '0-*', 'kind', 'started', 'data', '{}')
return 1
"""

# ARGV: id, replica, status, now, size, event kind, event data, then record fields.
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2]
    or (status ~= 'queued' and status ~= 'running') then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'finished_at', ARGV[4], 'size', ARGV[5])
if #ARGV > 7 then redis.call('HSET', KEYS[1], unpack(ARGV, 8)) end
if not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[4])
end
redis.call('HDEL', KEYS[1], 'body')
redis.call('XADD', KEYS[2], '0-*', 'kind', ARGV[6], 'data', ARGV[7])
redis.call('LREM', KEYS[3], 1, ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('INCRBY', KEYS[5], ARGV[5])
return 1
"""

# ARGV: id, now, the error body of a cancelled job, the cancel channel.
_CANCEL = """
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return 'missing' end
if status ~= 'queued' and status ~= 'running' then return 'final' end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], 'status', 'cancelled', 'finished_at', ARGV[2], 'size', 0,
             'error', ARGV[3])
  redis.call('HDEL', KEYS[2], 'body')
  redis.call('XADD', KEYS[3], '0-*', 'kind', 'error', 'data', ARGV[3])
  redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
  return 'cancelled'
end
redis.call('HSET', KEYS[2], 'cancel', '1')
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 'signalled'
"""

# ARGV: prefix, the replica to reap, now, the error body of a lost job (request_id filled in).
_REAP = """
local p, replica = ARGV[1], ARGV[2]
if redis.call('EXISTS', p .. 'alive:' .. replica) == 1 then return {} end
local claimed = p .. 'claimed:' .. replica
local ids = redis.call('LRANGE', claimed, 0, -1)
local lost = {}
for i = #ids, 1, -1 do
  local id = ids[i]
  local job = p .. 'job:' .. id
  local status = redis.call('HGET', job, 'status')
  if status == 'queued' then
    redis.call('HDEL', job, 'owner')
    redis.call('HINCRBY', job, 'requeued', 1)
    redis.call('LPUSH', KEYS[2], id)
  elseif status == 'running' then
    local body = cjson.decode(ARGV[4])
    body['error']['request_id'] = redis.call('HGET', job, 'request_id')
    local data = cjson.encode(body)
    redis.call('HSET', job, 'status', 'failed', 'finished_at', ARGV[3], 'size', 0, 'error', data)
    redis.call('HDEL', job, 'body')
    redis.call('XADD', p .. 'events:' .. id, '0-*', 'kind', 'error', 'data', data)
    redis.call('ZADD', KEYS[3], ARGV[3], id)
    table.insert(lost, id)
  end
end
redis.call('DEL', claimed)
redis.call('SREM', KEYS[1], replica)
return lost
"""

# ARGV: prefix, now, ttl, max jobs, max bytes, how long a gone id is remembered.
_ENFORCE = """
local p = ARGV[1]
local function forget(id, why)
  local job = p .. 'job:' .. id
  local size = tonumber(redis.call('HGET', job, 'size') or '0') or 0
  redis.call('DEL', job, p .. 'events:' .. id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('DECRBY', KEYS[2], size)
  redis.call('SET', p .. 'gone:' .. id, why, 'EX', ARGV[6])
end
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]))
for _, id in ipairs(old) do forget(id, 'expired') end
local evicted = 0
while redis.call('ZCARD', KEYS[1]) > tonumber(ARGV[4])
    or (redis.call('ZCARD', KEYS[1]) > 0
        and (tonumber(redis.call('GET', KEYS[2]) or '0') or 0) > tonumber(ARGV[5])) do
  forget(redis.call('ZRANGE', KEYS[1], 0, 0)[1], 'evicted')
  evicted = evicted + 1
end
return {#old, evicted}
"""

RECORD_FIELDS = (
    "status",
    "request_id",
    "created_at",
    "started_at",
    "finished_at",
    "progress",
    "tokens",
    "error",
    "result",
    "raw_format",
    "owner",
)


@dataclass
class Record:
    """What a job's status answer needs, read in one round trip (`raw` only when asked)."""

    id: str
    fields: dict[str, str]
    result: bytes | None
    raw: bytes | None
    position: int | None  # 1 = next to be claimed; None once claimed

    @property
    def status(self) -> str:
        return self.fields["status"]

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES

    def stamp(self, name: str) -> float | None:
        value = self.fields.get(name)
        return float(value) if value else None

    def timings(self) -> dict[str, float]:
        """Queue, run and total time in ms, from the wall-clock stamps of any replicas."""
        created = self.stamp("created_at") or 0.0
        end = self.stamp("finished_at") or time.time()
        start = self.stamp("started_at") or end
        return {
            "queue_ms": round((start - created) * 1000, 2),
            "inference_ms": round((end - start) * 1000, 2),
            "total_ms": round((end - created) * 1000, 2),
        }


class SharedJobStore:
    """The Redis operations of the shared jobs API; see the module docstring for the keys.

    Args:
        client: a `redis.asyncio.Redis` (bytes responses).
        prefix: JOB_STORE_PREFIX.
        replica: this replica's id, unique per process start.
    """

    def __init__(self, client: Any, prefix: str, replica: str) -> None:
        self.client, self.prefix, self.replica = client, prefix, replica
        self.queue = prefix + "queue"
        self.claimed = f"{prefix}claimed:{replica}"
        self.replicas = prefix + "replicas"
        self.finished = prefix + "finished"
        self.bytes = prefix + "bytes"
        self.cancel_channel = prefix + "cancel"
        self.round_trips = 0  # for bench/replicas.py's cost per job
        script = client.register_script
        self._enqueue = script(_ENQUEUE)
        self._own = script(_OWN)
        self._give_back = script(_GIVE_BACK)
        self._start = script(_START)
        self._finish = script(_FINISH)
        self._cancel = script(_CANCEL)
        self._reap = script(_REAP)
        self._enforce = script(_ENFORCE)

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}events:{job_id}"

    def _call(self) -> None:
        self.round_trips += 1

    # -- submitting and claiming ----------------------------------------------------------

    async def enqueue(self, job_id: str, record: dict[str, str | bytes], max_queue: int) -> int:
        """Stores the record and queues the id; the queue position, or -1 when it is full."""
        self._call()
        pairs: list[str | bytes] = []
        for name, value in record.items():
            pairs += [name, value]
        keys = [self.queue, self.job_key(job_id), self.events_key(job_id)]
        return int(await self._enqueue(keys=keys, args=[max_queue, job_id, *pairs]))

    async def claim(self, timeout_s: float) -> str | None:
        """Moves the oldest queued id onto this replica's claimed list, waiting up to
        `timeout_s` for one; None when none came or its record is gone."""
        self._call()
        raw = await self.client.blmove(self.queue, self.claimed, timeout_s, "LEFT", "RIGHT")
        if raw is None:
            return None
        job_id = raw.decode()
        self._call()
        keys = [self.job_key(job_id), self.claimed]
        owned = await self._own(keys=keys, args=[job_id, self.replica])
        return job_id if owned else None

    async def request(self, job_id: str) -> dict[str, bytes]:
        """The stored request of a claimed job, and what running it needs."""
        self._call()
        names = ("body", "content_type", "accept", "request_id", "created_at", "webhook", "cancel")
        values = await self.client.hmget(self.job_key(job_id), names)
        return {name: value for name, value in zip(names, values, strict=True) if value is not None}

    async def give_back(self, job_id: str) -> None:
        self._call()
        keys = [self.job_key(job_id), self.claimed, self.queue]
        await self._give_back(keys=keys, args=[job_id])

    # -- the running replica's side -------------------------------------------------------

    async def start(self, job_id: str) -> bool:
        self._call()
        keys = [self.job_key(job_id), self.events_key(job_id)]
        return bool(await self._start(keys=keys, args=[self.replica, time.time()]))

    async def add_events(self, job_id: str, events: Sequence[tuple[str, bytes]]) -> None:
        """Appends progress or token events, and keeps the record's latest progress and token
        count for status polls, in one round trip."""
        self._call()
        pipe = self.client.pipeline(transaction=False)
        key, stream = self.job_key(job_id), self.events_key(job_id)
        for kind, data in events:
            pipe.xadd(stream, {"kind": kind, "data": data}, id="0-*")
            if kind == "progress":
                pipe.hset(key, "progress", data)
            elif kind == "token":
                pipe.hincrby(key, "tokens", 1)
        await pipe.execute()

    async def finish(
        self,
        job_id: str,
        status: str,
        event: tuple[str, bytes],
        fields: dict[str, str | bytes],
        size: int,
    ) -> bool:
        """Ends a job this replica owns; False if it was not ours to end any more (reaped)."""
        self._call()
        keys = [
            self.job_key(job_id),
            self.events_key(job_id),
            self.claimed,
            self.finished,
            self.bytes,
        ]
        pairs: list[str | bytes] = []
        for name, value in fields.items():
            pairs += [name, value]
        args = [job_id, self.replica, status, time.time(), size, *event, *pairs]
        return bool(await self._finish(keys=keys, args=args))

    async def cancel_flags(self, job_ids: Sequence[str]) -> list[str]:
        """Which of these jobs someone asked to cancel (the pub/sub message's fallback)."""
        if not job_ids:
            return []
        self._call()
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.job_key(job_id), "cancel")
        flags = await pipe.execute()
        return [job_id for job_id, flag in zip(job_ids, flags, strict=True) if flag]

    # -- anyone's side --------------------------------------------------------------------

    async def cancel(self, job_id: str, error_data: bytes) -> str:
        """'cancelled' (it was queued), 'signalled' (its runner is told), 'final' or 'missing'."""
        self._call()
        keys = [self.queue, self.job_key(job_id), self.events_key(job_id), self.finished]
        args = [job_id, time.time(), error_data, self.cancel_channel]
        outcome = await self._cancel(keys=keys, args=args)
        return outcome.decode() if isinstance(outcome, bytes) else str(outcome)

    async def record(self, job_id: str, *, with_raw: bool = False) -> Record | None:
        """The job's record, or None when there is none (see `gone`)."""
        self._call()
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.job_key(job_id), [*RECORD_FIELDS, "raw"] if with_raw else RECORD_FIELDS)
        pipe.lpos(self.queue, job_id)
        values, index = await pipe.execute()
        if values[0] is None:
            return None
        fields = {
            name: value.decode()
            for name, value in zip(RECORD_FIELDS, values, strict=False)
            if value is not None and name != "result"
        }
        result = values[RECORD_FIELDS.index("result")]
        raw = values[len(RECORD_FIELDS)] if with_raw else None
        position = None if index is None else int(index) + 1
        return Record(job_id, fields, result, raw, position)

    async def gone(self, job_id: str) -> str | None:
        """'expired' or 'evicted' for an id that was here, else None."""
        self._call()
        why = await self.client.get(f"{self.prefix}gone:{job_id}")
        return why.decode() if why else None

    async def webhook_of(self, job_id: str) -> str | None:
        self._call()
        url = await self.client.hget(self.job_key(job_id), "webhook")
        return url.decode() if url else None

    async def events(
        self, job_id: str, after: int, block_s: float
    ) -> list[tuple[int, str, bytes]] | None:
        """Events numbered after `after`, waiting up to `block_s` for the first; [] when none
        came, None when the stream is gone."""
        self._call()
        key = self.events_key(job_id)
        reply = await self.client.xread({key: f"0-{after}"}, block=max(int(block_s * 1000), 1))
        if not reply:
            self._call()
            return None if not await self.client.exists(key) else []
        out = []
        for entry_id, entry in reply[0][1]:
            number = int(entry_id.decode().split("-")[1])
            out.append((number, entry[b"kind"].decode(), entry[b"data"]))
        return out

    # -- the fleet ------------------------------------------------------------------------

    async def heartbeat(self, lease_s: float) -> None:
        """Renews this replica's lease and names it among the replicas."""
        self._call()
        pipe = self.client.pipeline(transaction=False)
        pipe.set(f"{self.prefix}alive:{self.replica}", b"1", px=max(int(lease_s * 1000), 1))
        pipe.sadd(self.replicas, self.replica)
        await pipe.execute()

    async def leave(self, lost_error: bytes) -> list[str]:
        """Drops this replica's lease and reaps itself: what it only claimed is queued again."""
        self._call()
        await self.client.delete(f"{self.prefix}alive:{self.replica}")
        return await self.reap(self.replica, lost_error)

    async def reap_all(self, lost_error: bytes) -> list[str]:
        """Reaps every replica whose lease lapsed; the ids of the running jobs it lost."""
        self._call()
        lost: list[str] = []
        for member in await self.client.smembers(self.replicas):
            replica = member.decode()
            if replica != self.replica:
                lost += await self.reap(replica, lost_error)
        return lost

    async def reap(self, replica: str, lost_error: bytes) -> list[str]:
        self._call()
        keys = [self.replicas, self.queue, self.finished]
        lost = await self._reap(keys=keys, args=[self.prefix, replica, time.time(), lost_error])
        if lost:
            logger.warning("replica %s lost %d running jobs", replica, len(lost))
        return [job_id.decode() for job_id in lost]

    async def enforce(self, ttl_s: float, max_jobs: int, max_bytes: int) -> tuple[int, int]:
        """Forgets finished jobs past the TTL, then the oldest over the count or byte cap."""
        self._call()
        args = [self.prefix, time.time(), ttl_s, max_jobs, max_bytes, GONE_KEPT_S]
        expired, evicted = await self._enforce(keys=[self.finished, self.bytes], args=args)
        return int(expired), int(evicted)

    async def queue_length(self) -> int:
        self._call()
        return int(await self.client.llen(self.queue))


def json_data(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def redacted(url: str) -> str:
    """The URL with any password replaced by `***`, for logs, /health and errors."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return parts._replace(netloc=f"{user}:***@{host}{port}").geturl()

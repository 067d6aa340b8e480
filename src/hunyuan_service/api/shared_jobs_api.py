"""The jobs API on a Redis store shared by replicas (JOB_STORE_URL); see engine/shared_jobs.py.

A replica that accepts `POST /v1/jobs` validates the body exactly as the in-memory API does (the
same 4xx), stores the request as sent and queues its id. Every replica pulls from that one queue,
oldest first, only when its own scheduler has room, and runs the job by preparing the stored
request again (image URLs are fetched again by the replica that runs the job). Its events go to
the job's Redis stream, its result or error to the job's record; any replica answers a poll, an
event stream or a DELETE. `/infer` and the OpenAI routes never touch Redis.

If Redis cannot be reached, `/ready` answers 503, the jobs routes answer 503 naming the store,
and the loops below retry every heartbeat until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Message

from hunyuan_service.api.body import read_body, requested_image_type
from hunyuan_service.api.deps import request_id_of
from hunyuan_service.api.encoding import json_bytes, json_object
from hunyuan_service.api.renderers import KEEPALIVE, SSE_HEADERS, Prepared
from hunyuan_service.engine.engine import Engine, JobHandle, new_job_id
from hunyuan_service.engine.events import Progress, Started, Token
from hunyuan_service.engine.jobs import JobStatus, StopReason
from hunyuan_service.engine.shared_jobs import Record, SharedJobStore, json_data, redacted
from hunyuan_service.engine.store import shown_id
from hunyuan_service.errors import (
    DeadlineExceeded,
    JobCancelled,
    NotFound,
    QueueFull,
    ServiceError,
    Unavailable,
    error_body,
)

if TYPE_CHECKING:
    from hunyuan_service.api.webhooks import WebhookSender

logger = logging.getLogger(__name__)

T = TypeVar("T")

ROOM_POLL_S = 0.02  # how often a replica with no room looks again before pulling
CLAIM_WAIT_S = 1.0  # one blocking pull; the loop then checks for room and shutdown again


def lost_error() -> ServiceError:
    return ServiceError(
        "the replica running this job stopped answering (killed, or its node lost) before it "
        "finished; submit the job again",
        code="replica_lost",
    )


class SharedJobs:
    """One replica's part of the shared jobs API: the routes' handlers and three loops (pull,
    heartbeat and reaping, cancel messages)."""

    def __init__(self, engine: Engine, webhooks: WebhookSender) -> None:
        import redis.asyncio

        settings = engine.settings
        assert settings.job_store_url is not None
        url = settings.job_store_url.get_secret_value()
        self.engine, self.webhooks, self.settings = engine, webhooks, settings
        self.url = redacted(url)
        self.heartbeat_s = settings.job_store_heartbeat_s
        # Blocking reads (a pull, an event stream's wait) must end before the socket times out.
        socket_timeout = max(settings.stream_keepalive_s, CLAIM_WAIT_S) + 10
        client = redis.asyncio.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=max(self.heartbeat_s, 1)
        )
        self.replica = "r_" + secrets.token_hex(6)
        self.store = SharedJobStore(client, settings.job_store_prefix, self.replica)
        self.reachable = False
        self._last_error = "not connected yet"
        self._prepare: Callable[[Request, Engine], Awaitable[Prepared]] | None = None
        self._running: dict[str, JobHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._closing = False
        self.counters = {"pulled": 0, "given_back": 0, "reaped_lost": 0}

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, prepare: Callable[[Request, Engine], Awaitable[Prepared]]) -> None:
        self._prepare = prepare
        logger.info("jobs API on the shared store %s as replica %s", self.url, self.replica)
        self._loops = [
            asyncio.create_task(self._beat(), name="jobs-heartbeat"),
            asyncio.create_task(self._pull(), name="jobs-pull"),
            asyncio.create_task(self._listen(), name="jobs-cancel"),
        ]

    async def aclose(self, grace_s: float) -> None:
        """Stops pulling, gives jobs in flight `grace_s` to store their ends, then leaves: jobs
        this replica only claimed go back to the head of the queue."""
        self._closing = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            error = Unavailable("the replica running this job shut down", code="shutdown")
            await self.store.leave(json_data(error_body(error, None)))
        with contextlib.suppress(Exception):
            await self.store.client.aclose()

    def health(self) -> dict[str, Any]:
        """For /health and /ready: where the store is (no password) and whether it answers."""
        body: dict[str, Any] = {
            "backend": "redis",
            "url": self.url,
            "reachable": self.reachable,
            "replica": self.replica,
        }
        if not self.reachable:
            body["error"] = self._last_error
        return body

    def _mark(self, ok: bool, error: BaseException | None = None) -> None:
        if ok and not self.reachable:
            logger.info("job store %s reachable", self.url)
        elif not ok:
            self._last_error = type(error).__name__ if error else "unreachable"
            if self.reachable:
                logger.warning("job store %s unreachable: %s", self.url, self._last_error)
        self.reachable = ok

    async def _io(self, call: Awaitable[T]) -> T:
        """One store call from a route: a Redis failure is a 503 that names the store."""
        from redis.exceptions import RedisError

        try:
            return await call
        except RedisError as error:
            self._mark(False, error)
            raise self._unavailable() from error

    def _unavailable(self) -> Unavailable:
        return Unavailable(
            f"the job store ({self.url}) is unreachable; /v1/jobs is unavailable until it is "
            "back (/infer still works)",
            code="job_store_unavailable",
            retry_after_s=max(1, round(self.heartbeat_s)),
        )

    # -- the routes -----------------------------------------------------------------------

    async def submit(self, request: Request) -> JSONResponse:
        """Validates the body as the in-memory API does, then stores and queues it."""
        engine, settings = self.engine, self.settings
        engine.check_ready()
        if not self.reachable:
            raise self._unavailable()
        body = await read_body(request, engine)
        content_type = request.headers.get("content-type", "")
        accept = request.headers.get("accept", "")
        request_id = request_id_of(request)
        assert self._prepare is not None
        prepared = await self._prepare(replayed(body, content_type, accept, request_id), engine)
        if prepared.reservation is not None:
            prepared.reservation.release()  # the job is queued in the store, not here
        job_id, now = new_job_id(), time.time()
        record: dict[str, str | bytes] = {
            "status": JobStatus.QUEUED.value,
            "request_id": request_id,
            "created_at": repr(now),
            "body": body,
            "content_type": content_type,
            "accept": accept,
        }
        if prepared.webhook is not None:
            record["webhook"] = prepared.webhook
        position = await self._io(self.store.enqueue(job_id, record, settings.max_queue_size))
        if position < 0:
            scheduler = engine.check_ready()
            raise QueueFull(
                f"the fleet's job queue is full ({settings.max_queue_size} waiting); retry later",
                retry_after_s=scheduler.retry_after_s(settings.max_queue_size),
            )
        from hunyuan_service.api.jobs_routes import summary_fields

        fields = summary_fields(
            job_id, "queued", now, request_id, position=position, progress=None, tokens=0
        )
        return JSONResponse(fields, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})

    async def record(self, job_id: str, *, with_raw: bool = False) -> Record:
        """The job's record, or the 404 that says whether it expired, was evicted or never was."""
        found = await self._io(self.store.record(job_id, with_raw=with_raw))
        finished_at = found.stamp("finished_at") if found is not None else None
        if finished_at is not None and time.time() - finished_at > self.settings.job_result_ttl_s:
            await self._io(self._enforce())  # past its TTL: forget it now, not at the next beat
            found = None
        if found is not None:
            return found
        why = await self._io(self.store.gone(job_id))
        if why == "expired":
            raise NotFound(
                f"job {shown_id(job_id)} has expired: results are kept "
                f"JOB_RESULT_TTL_S={self.settings.job_result_ttl_s:g} s after the job ends",
                code="job_expired",
            )
        if why == "evicted":
            raise NotFound(
                f"job {shown_id(job_id)} was evicted to make room: the store keeps at most "
                f"MAX_STORED_JOBS={self.settings.max_stored_jobs} finished jobs and "
                f"JOB_STORE_MAX_BYTES={self.settings.job_store_max_bytes} bytes of results, "
                "oldest first",
                code="job_evicted",
            )
        raise NotFound(
            f"no job {shown_id(job_id)}: the id is unknown to this store", code="job_not_found"
        )

    async def status(self, job_id: str, request: Request) -> Response:
        from hunyuan_service.api.jobs_routes import raw_result

        fmt = requested_image_type(request.headers.get("accept", ""))
        found = await self.record(job_id, with_raw=fmt is not None)
        if fmt is not None and found.status == JobStatus.SUCCEEDED.value:
            return raw_result(found.raw, found.fields.get("raw_format"), fmt)
        return Response(status_body(found), media_type="application/json")

    async def events(self, job_id: str, after: int) -> StreamingResponse:
        """The job's events from its stream, from any replica; resumable with Last-Event-ID."""
        await self.record(job_id)  # a 404 before the stream starts
        keepalive_s = self.settings.stream_keepalive_s

        async def body() -> AsyncIterator[bytes]:
            last = after
            while True:
                try:
                    batch = await self.store.events(job_id, last, keepalive_s)
                    if batch is None:
                        return  # expired meanwhile
                    if not batch:
                        yield KEEPALIVE
                        continue
                    for number, kind, data in batch:
                        last = number
                        if kind == "result":
                            found = await self.store.record(job_id)
                            data = found.result if found and found.result else b"null"
                        yield b"id: %d\nevent: %s\ndata: %s\n\n" % (number, kind.encode(), data)
                        if kind in ("result", "error"):
                            return
                except Exception:  # the store went away: end here; the client resumes later
                    return

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def cancel(self, job_id: str) -> Response:
        """Cancels the job wherever it is; a running one is waited for (a step or a token)."""
        found = await self.record(job_id)
        error = JobCancelled("the job was cancelled", code=StopReason.USER.value)
        data = json_data(error_body(error, found.fields.get("request_id")))
        outcome = await self._io(self.store.cancel(job_id, data))
        if outcome == "signalled":
            await self._until_final(job_id, 4 * self.heartbeat_s + 5)
        return Response(status_body(await self.record(job_id)), media_type="application/json")

    async def _until_final(self, job_id: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = 0
        while (left := deadline - time.monotonic()) > 0:
            batch = await self._io(self.store.events(job_id, last, min(left, 1.0)))
            if batch is None:
                return
            for number, kind, _data in batch:
                last = number
                if kind in ("result", "error"):
                    return

    # -- the loops ------------------------------------------------------------------------

    async def _enforce(self) -> None:
        settings = self.settings
        await self.store.enforce(
            settings.job_result_ttl_s, settings.max_stored_jobs, settings.job_store_max_bytes
        )

    async def _beat(self) -> None:
        """Every heartbeat: renew the lease, apply the TTL and caps, reap replicas whose lease
        lapsed (delivering the webhooks of the jobs they lost), and catch cancels whose message
        was missed."""
        lost = json_data(error_body(lost_error(), None))
        while True:
            try:
                await self.store.heartbeat(3 * self.heartbeat_s)
                await self._enforce()
                for job_id in await self.store.reap_all(lost):
                    self.counters["reaped_lost"] += 1
                    self._spawn(self._notify(job_id))
                for job_id in await self.store.cancel_flags(list(self._running)):
                    handle = self._running.get(job_id)
                    if handle is not None:
                        handle.cancel(StopReason.USER)
                self._mark(True)
            except Exception as error:
                self._mark(False, error)
            await asyncio.sleep(self.heartbeat_s)

    async def _listen(self) -> None:
        """Cancel messages: a DELETE on any replica stops the job here at its next step."""
        while True:
            pubsub = self.store.client.pubsub()
            try:
                await pubsub.subscribe(self.store.cancel_channel)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is None:
                        continue
                    handle = self._running.get(message["data"].decode())
                    if handle is not None:
                        handle.cancel(StopReason.USER)
            except Exception as error:  # the heartbeat reports the store; retry after one
                logger.debug("cancel subscription lost: %s", type(error).__name__)
                await asyncio.sleep(self.heartbeat_s)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _can_pull(self) -> bool:
        engine = self.engine
        return (
            not self._closing
            and self.reachable
            and engine.is_ready
            and engine.scheduler is not None
            and engine.scheduler.has_room()
        )

    async def _pull(self) -> None:
        """Takes the oldest queued job whenever this replica could start it at once."""
        while True:
            if not self._can_pull():
                await asyncio.sleep(ROOM_POLL_S)
                continue
            try:
                job_id = await self.store.claim(CLAIM_WAIT_S)
            except Exception as error:  # the heartbeat reports the store; retry after one
                logger.debug("pulling failed: %s", type(error).__name__)
                await asyncio.sleep(self.heartbeat_s)
                continue
            if job_id is None:
                continue
            self.counters["pulled"] += 1
            try:
                await self._take(job_id)
            except Exception:
                logger.exception("taking a job from the store failed", extra={"job_id": job_id})

    async def _take(self, job_id: str) -> None:
        """Prepares a claimed job's stored request and submits it here."""
        stored = await self.store.request(job_id)
        request_id = stored.get("request_id", b"").decode()
        if b"cancel" in stored:
            error = JobCancelled("the job was cancelled", code=StopReason.USER.value)
            await self._end(job_id, "cancelled", error, request_id)
            return
        replay = replayed(
            stored.get("body", b""),
            stored.get("content_type", b"").decode(),
            stored.get("accept", b"").decode(),
            request_id,
        )
        assert self._prepare is not None
        try:
            prepared = await self._prepare(replay, self.engine)
        except (QueueFull, Unavailable):
            await self.store.give_back(job_id)  # /infer filled this replica meanwhile
            self.counters["given_back"] += 1
            return
        except ServiceError as refused:  # e.g. an image URL that no longer answers
            await self._end(job_id, "failed", refused, request_id)
            return
        waited = time.time() - float(stored.get("created_at", b"0") or 0)
        budget = min(
            prepared.timeout_s or self.settings.request_timeout_s, self.settings.request_timeout_s
        )
        if budget - waited <= 0:
            if prepared.reservation is not None:
                prepared.reservation.release()
            late = DeadlineExceeded(
                f"the job waited {waited:.0f} s in the shared queue, past its deadline "
                f"({budget:g} s); retry when the queue is shorter"
            )
            await self._end(job_id, "expired", late, request_id)
            return
        try:
            handle = self.engine.submit(
                prepared.payload,
                request_id,
                timeout_s=budget - waited,
                reservation=prepared.reservation,
                detached=True,
                job_id=job_id,
            )
        except (QueueFull, Unavailable):
            await self.store.give_back(job_id)
            self.counters["given_back"] += 1
            return
        self._running[job_id] = handle
        self._spawn(self._follow(job_id, handle, prepared))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, job_id: str, handle: JobHandle, prepared: Prepared) -> None:
        """Copies the job's events to its stream as they come (a write in flight carries every
        event that arrived meanwhile), then stores its end and sends its webhook."""
        pending: list[tuple[str, bytes]] = []
        writing: asyncio.Future[None] | None = None

        async def write(batch: list[tuple[str, bytes]]) -> None:
            with contextlib.suppress(Exception):  # events are best effort; the end is not
                await self.store.add_events(job_id, batch)

        try:
            async for _number, event in handle.events():
                if isinstance(event, Started):
                    if writing is not None:
                        await writing
                    with contextlib.suppress(Exception):
                        await self.store.start(job_id)
                elif isinstance(event, (Progress, Token)):
                    pending.append((event.kind, json_bytes(event.data())))
                    if writing is None or writing.done():
                        writing = asyncio.ensure_future(write(pending))
                        pending = []
            if writing is not None:
                await writing
            if pending:
                await write(pending)
            await self._store_end(job_id, handle, prepared)
        finally:
            self._running.pop(job_id, None)

    async def _store_end(self, job_id: str, handle: JobHandle, prepared: Prepared) -> None:
        if handle.status is JobStatus.SUCCEEDED:
            try:
                rendered = await prepared.render(handle.output, handle)
            except Exception as error:
                logger.exception("rendering a job's result failed", extra={"job_id": job_id})
                failed = ServiceError(f"the result could not be rendered: {type(error).__name__}")
                await self._end(job_id, "failed", failed, handle.request_id)
                return
            handle.forget_output()
            fields: dict[str, str | bytes] = {"result": rendered.body}
            if rendered.raw is not None:
                fields.update(raw=rendered.raw, raw_format=rendered.raw_format or "png")
            size = len(rendered.body) + len(rendered.raw or b"")
            stored = await self._retrying(
                lambda: self.store.finish(job_id, "succeeded", ("result", b""), fields, size)
            )
            if stored:
                self._spawn(self._notify(job_id, prepared.webhook))
            return
        assert handle.error is not None
        await self._end(job_id, handle.status.value, handle.error, handle.request_id)

    async def _end(self, job_id: str, status: str, error: ServiceError, request_id: str) -> None:
        """Stores a job's end without a result, then sends its webhook."""
        data = json_data(error_body(error, request_id))
        stored = await self._retrying(
            lambda: self.store.finish(job_id, status, ("error", data), {"error": data}, 0)
        )
        if stored:
            self._spawn(self._notify(job_id))

    async def _retrying(self, call: Callable[[], Awaitable[bool]]) -> bool:
        """Stores a job's end, retrying every heartbeat while the store is away (for as long
        as the result would be kept); False if the job was no longer ours (reaped)."""
        deadline = time.monotonic() + self.settings.job_result_ttl_s
        while True:
            try:
                return await call()
            except Exception:
                if time.monotonic() > deadline:
                    logger.error("a job's end could not be stored: the job store is away")
                    return False
                await asyncio.sleep(self.heartbeat_s)

    async def _notify(self, job_id: str, webhook: str | None = None) -> None:
        """The job's one webhook sequence, from the replica whose script ended the job."""
        try:
            webhook = webhook or await self.store.webhook_of(job_id)
            found = await self.store.record(job_id) if webhook else None
        except Exception:
            logger.warning(
                "a job's webhook was not sent: the store is away", extra={"job_id": job_id}
            )
            return
        if webhook and found is not None:
            await self.webhooks.deliver(webhook, status_body(found), job_id)


def status_body(found: Record) -> bytes:
    """The status JSON, as the in-memory API writes it."""
    from hunyuan_service.api.jobs_routes import summary_fields

    fields = found.fields
    progress = fields.get("progress")
    summary = summary_fields(
        found.id,
        found.status,
        found.stamp("created_at") or 0.0,
        fields.get("request_id", ""),
        position=found.position,
        progress=None if progress is None else _json(progress),
        tokens=int(fields.get("tokens", "0")),
    )
    if "error" in fields:
        summary["error"] = _json(fields["error"])["error"]
    if found.finished:
        summary["timings"] = found.timings()
    if found.status == JobStatus.SUCCEEDED.value and found.result is not None:
        return json_object(summary, {"result": found.result})
    return json_bytes(summary)


def _json(text: str) -> Any:
    import json

    return json.loads(text)


def replayed(body: bytes, content_type: str, accept: str, request_id: str) -> Request:
    """A request carrying a stored body, for the same preparation a live one gets. Its client
    never disconnects: the job's own cancel and deadline stop it."""
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type:
        headers.append((b"content-type", content_type.encode("latin-1")))
    if accept:
        headers.append((b"accept", accept.encode("latin-1")))
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/jobs",
        "raw_path": b"/v1/jobs",
        "query_string": b"",
        "headers": headers,
        "state": {"request_id": request_id},
    }
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # never set: no disconnect ever comes
        raise AssertionError("unreachable")

    return Request(scope, receive)

"""The async jobs API: submit with POST /v1/jobs, then poll, stream, fetch or cancel by id.

A job here outlives the connection that made it: its result is kept for JOB_RESULT_TTL_S after
it ends (bounded by MAX_STORED_JOBS and JOB_STORE_MAX_BYTES), its event stream can be opened,
dropped and resumed, and an optional webhook is called when it ends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from hunyuan_service.api.body import requested_image_type
from hunyuan_service.api.deps import EngineDep
from hunyuan_service.api.encoding import MEDIA_TYPES, json_bytes, json_object
from hunyuan_service.api.image2text import prepare_image2text
from hunyuan_service.api.renderers import Prepared, Rendered, event_stream
from hunyuan_service.api.schemas import Image2TextJobRequest, Text2ImageJobRequest
from hunyuan_service.api.text2image import prepare_text2image
from hunyuan_service.api.webhooks import WebhookSender
from hunyuan_service.engine.engine import Engine, JobHandle
from hunyuan_service.engine.jobs import JobStatus, StopReason
from hunyuan_service.engine.store import StoredJob
from hunyuan_service.errors import NotAcceptable, error_body

if TYPE_CHECKING:
    from hunyuan_service.api.shared_jobs_api import SharedJobs

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs")


class JobsApi:
    """The jobs API's own state: result rendering and webhook tasks, owned by the app."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.webhooks = WebhookSender(engine.settings)
        self._tasks: set[asyncio.Task[None]] = set()

    def track(self, entry: StoredJob, render: Any, webhook: str | None) -> None:
        task = asyncio.create_task(self._when_done(entry, render, webhook))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _when_done(self, entry: StoredJob, render: Any, webhook: str | None) -> None:
        """Renders the result once the job ends, stores it, then calls the webhook if any."""
        handle = entry.handle
        await handle.wait_finished()
        try:
            if handle.status is JobStatus.SUCCEEDED:
                entry.rendered = await render(handle.output, handle)
                handle.forget_output()  # the store keeps the encoded result, not the pixels
                size = len(entry.rendered.body) + len(entry.rendered.raw or b"")
                self.engine.jobs.set_size(entry, size)
        except Exception:
            logger.exception("rendering a job's result failed", extra={"job_id": handle.id})
            entry.rendered = None
        finally:
            entry.ready.set()
        if webhook is not None:
            await self.webhooks.deliver(webhook, status_body(entry), handle.id)

    async def aclose(self, grace_s: float) -> None:
        """Gives results and webhooks in flight `grace_s` to finish, then cancels the rest."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()


def jobs_api(request: Request) -> JobsApi:
    return request.app.state.jobs_api


def shared_jobs(request: Request) -> SharedJobs | None:
    """The shared (Redis) jobs API when JOB_STORE_URL is set; None keeps jobs in memory."""
    return request.app.state.shared_jobs


async def prepare_job(request: Request, engine: Engine) -> Prepared:
    """A /v1/jobs body validated and turned into the model's input, as /infer does."""
    if engine.settings.model_type == "text2image":
        return await prepare_text2image(request, engine, Text2ImageJobRequest)
    return await prepare_image2text(request, engine, Image2TextJobRequest)


@router.post("", status_code=202, response_model=None)
async def submit_job(request: Request, engine: EngineDep) -> JSONResponse:
    """Queues a job with the body /infer takes; answers 202 with its id at once."""
    shared = shared_jobs(request)
    if shared is not None:
        return await shared.submit(request)
    prepared = await prepare_job(request, engine)
    handle = prepared.submit(engine, request, detached=True)
    entry = engine.jobs.get(handle.id)
    jobs_api(request).track(entry, prepared.render, prepared.webhook)
    body = _summary(handle, entry)
    location = f"/v1/jobs/{handle.id}"
    return JSONResponse(body, status_code=202, headers={"Location": location})


@router.get("/{job_id}", response_model=None)
async def get_job(job_id: str, request: Request, engine: EngineDep) -> Response:
    """The job's status; a succeeded job carries the /infer result (or raw bytes by Accept)."""
    shared = shared_jobs(request)
    if shared is not None:
        return await shared.status(job_id, request)
    entry = engine.jobs.get(job_id)
    await _settled(entry)
    fmt = requested_image_type(request.headers.get("accept", ""))
    if fmt is not None and entry.handle.status is JobStatus.SUCCEEDED:
        rendered: Rendered | None = entry.rendered
        if rendered is None:
            return raw_result(None, None, fmt)
        return raw_result(rendered.raw, rendered.raw_format, fmt)
    return Response(status_body(entry), media_type="application/json")


def raw_result(raw: bytes | None, raw_format: str | None, fmt: str) -> Response:
    """A succeeded job's image as bytes, or a 406 saying what this job's result can be."""
    if raw is None:
        raise NotAcceptable("this job's result is text; ask for application/json")
    if raw_format != fmt:
        raise NotAcceptable(
            f"this job's image is {raw_format}; ask for "
            f"{MEDIA_TYPES[raw_format or 'png']} or application/json"
        )
    return Response(raw, media_type=MEDIA_TYPES[fmt])


@router.get("/{job_id}/events", response_model=None)
async def job_events(job_id: str, request: Request, engine: EngineDep) -> Response:
    """The job's SSE stream, replayed from the start or after `Last-Event-ID`.

    Unlike /infer's stream, dropping this one does not cancel the job.
    """
    last = request.headers.get("last-event-id", "").strip()
    after = int(last) if last.isdigit() else 0
    shared = shared_jobs(request)
    if shared is not None:
        return await shared.events(job_id, after)
    entry = engine.jobs.get(job_id)

    async def render(_output: Any, _handle: JobHandle) -> Rendered:
        await entry.ready.wait()
        return entry.rendered or Rendered(b"null")

    return event_stream(
        entry.handle,
        render,
        engine.settings.stream_keepalive_s,
        after=after,
        cancel_on_drop=False,
    )


@router.delete("/{job_id}", response_model=None)
async def cancel_job(job_id: str, request: Request, engine: EngineDep) -> Response:
    """Cancels a queued job (it never runs) or a running one (it stops within a step or token)."""
    shared = shared_jobs(request)
    if shared is not None:
        return await shared.cancel(job_id)
    entry = engine.jobs.get(job_id)
    entry.handle.cancel(StopReason.USER)
    await _settled(entry)
    return Response(status_body(entry), media_type="application/json")


async def _settled(entry: StoredJob) -> None:
    """A finished job's result is rendered moments after it ends; wait for that, not longer."""
    if entry.handle.finished:
        await entry.ready.wait()


def _summary(handle: JobHandle, entry: StoredJob) -> dict[str, Any]:
    running = handle.status is JobStatus.RUNNING
    progress = handle.progress() if running else None
    return summary_fields(
        handle.id,
        handle.status.value,
        entry.created_at,
        handle.request_id,
        position=handle.position() if handle.status is JobStatus.QUEUED else None,
        progress=progress.data() if progress is not None else None,
        tokens=handle.tokens() if running else 0,
    )


def summary_fields(
    job_id: str,
    status: str,
    created_at: float,
    request_id: str,
    *,
    position: int | None,
    progress: dict[str, Any] | None,
    tokens: int,
) -> dict[str, Any]:
    """A job's status fields, whichever store keeps it: a queued job's position, a running
    one's latest progress and token count."""
    body: dict[str, Any] = {
        "id": job_id,
        "object": "job",
        "status": status,
        "created_at": int(created_at),
        "request_id": request_id,
    }
    if status == JobStatus.QUEUED.value and position:
        body["position"] = position
    elif status == JobStatus.RUNNING.value:
        if progress is not None:
            body["progress"] = progress
        if tokens:
            body["tokens"] = tokens
    body["links"] = {"self": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events"}
    return body


def status_body(entry: StoredJob) -> bytes:
    """The status JSON: a succeeded job carries /infer's result body, a failed one its error."""
    handle = entry.handle
    fields = _summary(handle, entry)
    raw: dict[str, bytes] = {}
    if handle.status is JobStatus.SUCCEEDED and entry.rendered is not None:
        raw["result"] = entry.rendered.body
    if handle.error is not None:
        fields["error"] = error_body(handle.error, handle.request_id)["error"]
    if handle.finished:
        fields["timings"] = handle.timings()
    return json_object(fields, raw) if raw else json_bytes(fields)

"""The async jobs API: submit with POST /v1/jobs, then poll, stream, fetch or cancel by id.

A job here outlives the connection that made it: its result is kept for JOB_RESULT_TTL_S after
it ends (bounded by MAX_STORED_JOBS and JOB_STORE_MAX_BYTES), its event stream can be opened,
dropped and resumed, and an optional webhook is called when it ends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from hunyuan_service.api.body import requested_image_type
from hunyuan_service.api.deps import EngineDep
from hunyuan_service.api.encoding import MEDIA_TYPES, json_bytes, json_object
from hunyuan_service.api.image2text import prepare_image2text
from hunyuan_service.api.renderers import Rendered, event_stream
from hunyuan_service.api.schemas import Image2TextJobRequest, Text2ImageJobRequest
from hunyuan_service.api.text2image import prepare_text2image
from hunyuan_service.api.webhooks import WebhookSender
from hunyuan_service.engine.engine import Engine, JobHandle
from hunyuan_service.engine.jobs import JobStatus, StopReason
from hunyuan_service.engine.store import StoredJob
from hunyuan_service.errors import NotAcceptable, error_body

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


@router.post("", status_code=202, response_model=None)
async def submit_job(request: Request, engine: EngineDep) -> JSONResponse:
    """Queues a job with the body /infer takes; answers 202 with its id at once."""
    if engine.settings.model_type == "text2image":
        prepared = await prepare_text2image(request, engine, Text2ImageJobRequest)
    else:
        prepared = await prepare_image2text(request, engine, Image2TextJobRequest)
    handle = prepared.submit(engine, request, detached=True)
    entry = engine.jobs.get(handle.id)
    jobs_api(request).track(entry, prepared.render, prepared.webhook)
    body = _summary(handle, entry)
    location = f"/v1/jobs/{handle.id}"
    return JSONResponse(body, status_code=202, headers={"Location": location})


@router.get("/{job_id}", response_model=None)
async def get_job(job_id: str, request: Request, engine: EngineDep) -> Response:
    """The job's status; a succeeded job carries the /infer result (or raw bytes by Accept)."""
    entry = engine.jobs.get(job_id)
    await _settled(entry)
    fmt = requested_image_type(request.headers.get("accept", ""))
    if fmt is not None and entry.handle.status is JobStatus.SUCCEEDED:
        rendered: Rendered | None = entry.rendered
        if rendered is None or rendered.raw is None:
            raise NotAcceptable("this job's result is text; ask for application/json")
        if rendered.raw_format != fmt:
            raise NotAcceptable(
                f"this job's image is {rendered.raw_format}; ask for "
                f"{MEDIA_TYPES[rendered.raw_format or 'png']} or application/json"
            )
        return Response(rendered.raw, media_type=MEDIA_TYPES[fmt])
    return Response(status_body(entry), media_type="application/json")


@router.get("/{job_id}/events", response_model=None)
async def job_events(job_id: str, request: Request, engine: EngineDep) -> Response:
    """The job's SSE stream, replayed from the start or after `Last-Event-ID`.

    Unlike /infer's stream, dropping this one does not cancel the job.
    """
    entry = engine.jobs.get(job_id)
    last = request.headers.get("last-event-id", "").strip()
    after = int(last) if last.isdigit() else 0

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
async def cancel_job(job_id: str, engine: EngineDep) -> Response:
    """Cancels a queued job (it never runs) or a running one (it stops within a step or token)."""
    entry = engine.jobs.get(job_id)
    entry.handle.cancel(StopReason.USER)
    await _settled(entry)
    return Response(status_body(entry), media_type="application/json")


async def _settled(entry: StoredJob) -> None:
    """A finished job's result is rendered moments after it ends; wait for that, not longer."""
    if entry.handle.finished:
        await entry.ready.wait()


def _summary(handle: JobHandle, entry: StoredJob) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": handle.id,
        "object": "job",
        "status": handle.status.value,
        "created_at": int(entry.created_at),
        "request_id": handle.request_id,
    }
    position = handle.position()
    if handle.status is JobStatus.QUEUED and position:
        body["position"] = position
    elif handle.status is JobStatus.RUNNING:
        progress = handle.progress()
        if progress is not None:
            body["progress"] = progress.data()
        tokens = handle.tokens()
        if tokens:
            body["tokens"] = tokens
    body["links"] = {"self": f"/v1/jobs/{handle.id}", "events": f"/v1/jobs/{handle.id}/events"}
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

"""HTTP routes: /infer, health and readiness, and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.routing import Match, Route
from starlette.types import Scope

from hunyuan_service.api.deps import EngineDep
from hunyuan_service.api.image2text import prepare_image2text
from hunyuan_service.api.renderers import respond
from hunyuan_service.api.text2image import prepare_text2image
from hunyuan_service.engine.lifecycle import State

router = APIRouter()


class PlainRoute(Route):
    """A Starlette route that records itself in the scope as FastAPI's routes do, so the
    request counters label it with its template."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


async def infer(request: Request) -> Response:
    """Runs one request on the loaded model: text2image or image2text, by MODEL_TYPE.

    `create_app` registers it on the app itself, ahead of every other route."""
    # The hot path reads the engine directly; resolving a dependency costs ~50 us a request.
    engine = request.app.state.engine
    if engine.settings.model_type == "text2image":
        prepared = await prepare_text2image(request, engine)
    else:
        prepared = await prepare_image2text(request, engine)
    return await respond(request, engine, prepared)


# -- health and metrics ------------------------------------------------------------------------


@router.get("/health")
async def health(request: Request, engine: EngineDep) -> JSONResponse:
    """Liveness: 200 while the worker is alive, 503 once it has died or the CPU pool that
    decodes and encodes images is wedged (restart the process). A job store that cannot be
    reached is reported, not fatal: a restart would not bring it back."""
    status = with_job_store(request, engine.status())
    alive = engine.worker_alive or engine.state is State.STARTING
    return JSONResponse(
        status, status_code=200 if alive and not status["cpu_pool"]["wedged"] else 503
    )


@router.get("/ready")
async def ready(request: Request, engine: EngineDep) -> JSONResponse:
    """Readiness: 200 only while the model is loaded and new requests are accepted, and the
    shared job store (JOB_STORE_URL) answers, where one is set."""
    status = with_job_store(request, engine.status())
    ok = engine.state is State.READY and engine.worker_alive and not status["cpu_pool"]["wedged"]
    store = status.get("job_store")
    ok = ok and (store is None or store["reachable"])
    return JSONResponse(status, status_code=200 if ok else 503)


def with_job_store(request: Request, status: dict[str, Any]) -> dict[str, Any]:
    shared = request.app.state.shared_jobs
    if shared is not None:
        status["job_store"] = shared.health()
    return status


# Probes answer HEAD as they answer GET (the body is dropped), out of the OpenAPI document.
router.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/ready", ready, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format (prometheus-client): requests, jobs, queue, latency, model, GPU."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)

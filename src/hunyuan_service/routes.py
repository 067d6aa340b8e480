"""HTTP routes: /infer, health and readiness, and Prometheus metrics."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from hunyuan_service.image2text_api import infer_image2text
from hunyuan_service.metrics import render_prometheus
from hunyuan_service.schemas import Image2TextRequest, Text2ImageRequest, Text2ImageResponse
from hunyuan_service.service import Phase, ServiceDep
from hunyuan_service.text2image_api import infer_text2image

logger = logging.getLogger(__name__)

router = APIRouter()


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with nested definitions inlined, so it stands alone in OpenAPI."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)


def _infer_openapi() -> dict[str, Any]:
    """Documents /infer's bodies, which the handler parses itself (JSON, multipart, or SSE)."""
    json_bodies = [_schema(Text2ImageRequest), _schema(Image2TextRequest)]
    form = _schema(Image2TextRequest)
    form["properties"]["images"] = {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"oneOf": json_bodies}},
                "multipart/form-data": {"schema": form},
            },
        },
        "responses": {
            "200": {
                "description": "JSON (text2image: Text2ImageResponse; image2text: text), raw "
                "image bytes for Accept: image/*, or Server-Sent Events when streaming.",
                "content": {
                    "application/json": {"schema": _schema(Text2ImageResponse)},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            }
        },
    }


@router.post("/infer", response_model=None, openapi_extra=_infer_openapi())
async def infer(request: Request) -> Response:
    """Runs one request on the loaded model: text2image or image2text, by MODEL_TYPE."""
    # The hot path reads the service directly; resolving a dependency costs ~50 us a request.
    service = request.app.state.service
    if service.settings.model_type == "text2image":
        return await infer_text2image(request, service)
    return await infer_image2text(request, service)


# -- health and metrics ------------------------------------------------------------------------


@router.get("/health")
async def health(service: ServiceDep) -> JSONResponse:
    """Liveness: 200 while the worker is alive, 503 once it has died (restart the process)."""
    body = service.status()
    alive = service.scheduler is not None and service.scheduler.worker_alive
    return JSONResponse(body, status_code=200 if alive or service.phase is Phase.STARTING else 503)


@router.get("/ready")
async def ready(service: ServiceDep) -> JSONResponse:
    """Readiness: 200 only while the model is loaded and new requests are accepted."""
    body = service.status()
    ok = (
        service.phase is Phase.READY
        and service.scheduler is not None
        and service.scheduler.worker_alive
    )
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response)
async def metrics(service: ServiceDep) -> Response:
    """Prometheus text format: job counters, latency histograms, queue depth, busy and ready."""
    text = render_prometheus(service.scheduler, ready=service.phase is Phase.READY)
    return Response(text, media_type="text/plain; version=0.0.4")

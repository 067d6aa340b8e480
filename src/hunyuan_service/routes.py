"""HTTP routes: /infer, health and readiness, and Prometheus metrics."""

from __future__ import annotations

import base64
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from hunyuan_service.errors import InvalidInput, PayloadTooLarge, Unavailable, UnsupportedMediaType
from hunyuan_service.imageio import MEDIA_TYPES, encode_image
from hunyuan_service.schemas import Text2ImageRequest, describe_validation_errors
from hunyuan_service.service import Phase, Service, ServiceDep, request_id_of
from hunyuan_service.worker import Scheduler

logger = logging.getLogger(__name__)

router = APIRouter()


# -- request helpers ---------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """Reads the body, refusing it with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; at most {limit} are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over {limit} bytes, the most accepted")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes, schema: type[BaseModel], service: Service) -> Any:
    """Validates a JSON body against `schema` and the operator's limits; 422 names the field."""
    try:
        return schema.model_validate_json(body or b"{}", context={"settings": service.settings})
    except ValidationError as error:
        message, param = describe_validation_errors(list(error.errors()))
        raise InvalidInput(message, param=param) from None


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away. Only valid once the body has been read."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def requested_image_type(accept: str) -> str | None:
    """The image format an `Accept: image/...` header asks for, or None for JSON."""
    for part in accept.split(","):
        media_type = part.split(";", 1)[0].strip().lower()
        for fmt, known in MEDIA_TYPES.items():
            if media_type == known:
                return fmt
    return None


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


# -- /infer ------------------------------------------------------------------------------------


@router.post("/infer", response_model=None)
async def infer(request: Request, service: ServiceDep) -> Response:
    """Runs one request on the loaded model: text2image or image2text, by MODEL_TYPE."""
    if service.settings.model_type == "text2image":
        return await _text2image(request, service)
    from hunyuan_service.vision_routes import image2text

    return await image2text(request, service)


async def _text2image(request: Request, service: Service) -> Response:
    from hunyuan_service.models.flux import Text2ImageInput

    scheduler = scheduler_for(service)
    # Any non-multipart body is read as JSON: curl's `-d` sends a form content type by default.
    if is_multipart(request):
        raise UnsupportedMediaType("text2image takes a JSON body, not multipart/form-data")
    body = await read_body(request, service.settings.max_body_bytes)
    params: Text2ImageRequest = parse_json(body, Text2ImageRequest, service)
    raw_format = requested_image_type(request.headers.get("accept", ""))
    fmt = raw_format or params.output_format
    payload = Text2ImageInput(
        prompt=params.prompt,
        width=params.width,
        height=params.height,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        seed=params.seed,
    )
    job = scheduler.submit(payload, request_id_of(request), timeout_s=params.timeout_s)
    output = await scheduler.wait(job, wait_for_disconnect(request))
    data = await service.run_cpu(encode_image, output.image, fmt)
    timings = job.timings()
    if raw_format is not None:
        return Response(
            data,
            media_type=MEDIA_TYPES[fmt],
            headers={"X-Seed": str(output.seed), "Server-Timing": _server_timing(timings)},
        )
    image_base64 = await service.run_cpu(_b64, data)
    width, height = output.image.size
    return JSONResponse(
        {
            "image_base64": image_base64,
            "format": fmt,
            "width": width,
            "height": height,
            "seed": output.seed,
            "timings": timings,
        }
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{name.removesuffix('_ms')};dur={value}" for name, value in timings.items())


def scheduler_for(service: Service) -> Scheduler:
    if service.scheduler is None or service.phase is not Phase.READY:
        raise Unavailable(f"the service is {service.phase.value}; retry shortly", retry_after_s=1)
    return service.scheduler


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
    """Prometheus text format: job counters, queue depth and busy state."""
    lines = []
    scheduler = service.scheduler
    counters = dict(scheduler.counters) if scheduler else {}
    lines += ["# HELP hunyuan_jobs_total Jobs by outcome.", "# TYPE hunyuan_jobs_total counter"]
    for outcome, count in sorted(counters.items()):
        lines.append(f'hunyuan_jobs_total{{outcome="{outcome}"}} {count}')
    gauges = {
        "hunyuan_queue_depth": (scheduler.queue_depth if scheduler else 0, "Jobs waiting."),
        "hunyuan_busy": (int(scheduler.busy) if scheduler else 0, "1 while a job runs."),
        "hunyuan_ready": (int(service.phase is Phase.READY), "1 while accepting requests."),
    }
    for name, (value, help_text) in gauges.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
    return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

"""HTTP routes: /infer, health and readiness, and Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from hunyuan_service.image2text_api import infer_image2text
from hunyuan_service.service import Phase, ServiceDep
from hunyuan_service.text2image_api import infer_text2image

logger = logging.getLogger(__name__)

router = APIRouter()


@router.post("/infer", response_model=None)
async def infer(request: Request, service: ServiceDep) -> Response:
    """Runs one request on the loaded model: text2image or image2text, by MODEL_TYPE."""
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
    if scheduler is not None:
        histograms = {
            "hunyuan_inference_seconds": (
                scheduler.inference_seconds,
                "Run time of completed jobs.",
            ),
            "hunyuan_queue_wait_seconds": (scheduler.queue_wait_seconds, "Wait before a job ran."),
        }
        for name, (histogram, help_text) in histograms.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
            for bound, count in zip(histogram.BUCKETS, histogram.counts, strict=True):
                lines.append(f'{name}_bucket{{le="{bound:g}"}} {count}')
            lines += [
                f'{name}_bucket{{le="+Inf"}} {histogram.total}',
                f"{name}_sum {histogram.sum:.6f}",
                f"{name}_count {histogram.total}",
            ]
    return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

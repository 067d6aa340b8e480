"""The app factory: lifespan (load the model, run the worker), errors and request ids."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hunyuan_service import __version__
from hunyuan_service.auth import ApiKeyMiddleware
from hunyuan_service.errors import (
    InternalError,
    InvalidInput,
    ModelLoadError,
    NotFound,
    ServiceError,
    error_body,
)
from hunyuan_service.models.base import InferenceModel
from hunyuan_service.openai_api import router as openai_router
from hunyuan_service.routes import router
from hunyuan_service.schemas import describe_validation_errors
from hunyuan_service.service import Phase, Service, new_request_id, request_id_of
from hunyuan_service.settings import Settings
from hunyuan_service.worker import Scheduler

logger = logging.getLogger(__name__)


_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestIdMiddleware:
    """Gives every request an id (the client's X-Request-ID if sane) and echoes it back.

    Pure ASGI rather than `@app.middleware`, which would wrap every response in extra tasks.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SAFE_ID.match(given) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


def error_response(error: ServiceError, request: Request) -> JSONResponse:
    return JSONResponse(
        error_body(error, request_id_of(request)),
        status_code=error.status_code,
        headers=error.headers(),
    )


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
        return error_response(error, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(list(error.errors()))
        return error_response(InvalidInput(message, param=param), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            mapped: ServiceError = NotFound(f"no route {request.url.path}")
        else:
            mapped = ServiceError(str(error.detail))
            mapped.status_code = error.status_code
            mapped.error_type = "invalid_request_error"
            mapped.code = "http_error"
        return error_response(mapped, request)

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, _error: ClientDisconnect) -> Response:
        # The client hung up while sending its body; nobody is left to read an answer.
        logger.info(
            "client disconnected during upload", extra={"request_id": request_id_of(request)}
        )
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        request_id = request_id_of(request)
        logger.error("unhandled error", exc_info=error, extra={"request_id": request_id})
        generic = InternalError(f"internal error; see the server log for request {request_id}")
        return error_response(generic, request)


def create_app(settings: Settings | None = None, model: InferenceModel | None = None) -> FastAPI:
    """Builds the app. Nothing heavy happens until the lifespan starts.

    Args:
        settings: the configuration; read from the environment when None.
        model: a model instance to serve (tests pass fakes); built from the registry when None.
    """
    settings = settings or Settings()
    service = Service(settings, model)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        if service.model is None:
            from hunyuan_service.models.registry import get_model

            service.model = get_model(settings)
        logger.info(
            "loading model",
            extra={"model_type": settings.model_type, "model_id": settings.model_id},
        )
        try:
            await asyncio.to_thread(service.model.load)
        except ModelLoadError as error:
            service.phase = Phase.FAILED
            logger.error("cannot start: %s", error)  # uvicorn logs the traceback once more
            raise
        except Exception:
            service.phase = Phase.FAILED
            logger.exception("model failed to load; the service will not start")
            raise
        scheduler = Scheduler(service.model, settings.max_queue_size, settings.request_timeout_s)
        scheduler.start()
        service.scheduler = scheduler
        if service.phase is Phase.STARTING:
            service.phase = Phase.READY
        info = service.model.info
        logger.info("ready", extra={"device": info.device, "dtype": info.dtype, "demo": info.demo})
        if info.demo:
            logger.warning("DEMO MODEL in use: tiny random weights; outputs are noise")
        if settings.api_key is None:
            logger.warning("API_KEY is not set: every endpoint is open to anyone who can reach it")
        else:
            logger.info("API key required on every endpoint except /health and /ready")
        try:
            yield {"service": service}
        finally:
            service.begin_drain()
            finished = await scheduler.drain(settings.shutdown_timeout_s)
            if not finished:
                logger.warning("shutdown timeout reached with jobs still in flight")
            await scheduler.stop()
            service.cpu_pool.shutdown(wait=False, cancel_futures=True)
            service.phase = Phase.STOPPED
            logger.info("stopped", extra=dict(scheduler.counters))

    app = FastAPI(
        title="hunyuan-service",
        version=__version__,
        lifespan=lifespan,
        description="One generative model on one GPU behind an HTTP API.",
    )
    app.state.service = service
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())
    # Added last, so it runs first: even a refused request gets its id.
    app.add_middleware(RequestIdMiddleware)
    _install_error_handlers(app)

    app.include_router(router)
    app.include_router(openai_router)
    return app

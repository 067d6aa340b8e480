"""The app factory: the lifespan (start and stop the engine), routers and error handlers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from hunyuan_service import __version__
from hunyuan_service.api import openapi
from hunyuan_service.api.deps import request_id_of
from hunyuan_service.api.jobs_routes import JobsApi, prepare_job
from hunyuan_service.api.jobs_routes import router as jobs_router
from hunyuan_service.api.middleware import (
    ApiKeyMiddleware,
    BrowserGuard,
    RequestMiddleware,
)
from hunyuan_service.api.openai_responses import router as responses_router
from hunyuan_service.api.openai_routes import router as openai_router
from hunyuan_service.api.playground import router as playground_router
from hunyuan_service.api.routes import PlainRoute, infer, router
from hunyuan_service.api.schemas import describe_validation_errors
from hunyuan_service.api.slow_clients import HeaderGuard
from hunyuan_service.engine.engine import Engine
from hunyuan_service.engine.metrics import metrics_registry
from hunyuan_service.errors import (
    InternalError,
    InvalidInput,
    NotFound,
    ServiceError,
    error_body,
)
from hunyuan_service.models.base import InferenceModel
from hunyuan_service.settings import Settings

logger = logging.getLogger(__name__)

# Finished jobs' results and webhooks still being sent get this long after the drain.
WEBHOOK_GRACE_S = 5.0


def error_response(error: ServiceError, request: Request) -> JSONResponse:
    if 400 <= error.status_code < 500:
        request.app.state.engine.client_errors[(error.status_code, error.code)] += 1
    elif error.status_code == 503:
        request.app.state.engine.rejections[error.code] += 1
    return JSONResponse(
        error_body(error, request_id_of(request)),
        status_code=error.status_code,
        headers=error.headers(),
    )


HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """The methods some route fully serves at this request's path, asked of the router itself
    (routes may sit in included routers)."""
    from starlette.routing import Match

    return [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in request.app.router.routes
        )
    ]


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
        response = error_response(mapped, request)
        # Starlette's own headers, e.g. the `Allow` that a 405 must carry.
        response.headers.update(error.headers or {})
        if error.status_code == 405:
            # Starlette names the methods of the first route that matched the path; a path
            # served by several routes (GET and DELETE /v1/jobs/{id}) allows all of theirs.
            response.headers["Allow"] = ", ".join(allowed_methods(request))
        return response

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


def create_app(
    settings: Settings | None = None,
    model: InferenceModel | None = None,
    *,
    load_in_background: bool = False,
    on_start_failed: Callable[[], None] | None = None,
) -> FastAPI:
    """Builds the app. Nothing heavy happens until the lifespan starts.

    Args:
        settings: the configuration; read from the environment when None.
        model: a model instance to serve (tests pass fakes); built from the registry when None.
        load_in_background: serve at once and load the model meanwhile (the command does this):
            `/health` reports the loading phase and `/ready` answers 503 until it is done.
            Otherwise the lifespan waits for the model, as tests expect.
        on_start_failed: called when a background load fails, to stop the server.
    """
    settings = settings or Settings()
    engine = Engine(settings, model)
    jobs_api = JobsApi(engine)
    shared_jobs = None
    if settings.job_store_url is not None:
        from hunyuan_service.api.shared_jobs_api import SharedJobs

        shared_jobs = SharedJobs(engine, jobs_api.webhooks)

    async def start_in_background() -> None:
        try:
            await engine.start()
        except Exception:  # logged by the engine, in one line where the cause is known
            if on_start_failed is not None:
                on_start_failed()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        loading = None
        if load_in_background:
            loading = asyncio.create_task(start_in_background())
        else:
            await engine.start()
        if shared_jobs is not None:
            shared_jobs.start(prepare_job)
        if settings.api_key is None:
            logger.warning("API_KEY is not set: every endpoint is open to anyone who can reach it")
        else:
            logger.info("API key required on every endpoint except /health and /ready")
        try:
            yield {"engine": engine}
        finally:
            if loading is not None and not loading.done():
                engine.begin_drain()  # a stop during loading: never turn ready
                loading.cancel()  # the load's daemon thread is left to die with the process
            await engine.stop()
            grace_s = min(WEBHOOK_GRACE_S, settings.shutdown_timeout_s)
            if shared_jobs is not None:
                await shared_jobs.aclose(grace_s)
            await jobs_api.aclose(grace_s)
            engine.close()

    app = FastAPI(
        title="hunyuan-service",
        version=__version__,
        lifespan=lifespan,
        description="One generative model on one GPU behind an HTTP API.",
        openapi_url=None,  # its routes (and /docs) are added after /infer, below
    )
    app.state.engine = engine
    app.state.jobs_api = jobs_api
    app.state.shared_jobs = shared_jobs
    # The command serves with this guard's protocol (`__main__`); /metrics reports its closes.
    app.state.header_guard = guard = HeaderGuard.from_settings(settings)
    app.state.metrics = metrics_registry(
        engine, jobs_api.webhooks.counts, lambda: dict(guard.closed)
    )
    if settings.api_key is not None:
        app.add_middleware(
            ApiKeyMiddleware,
            api_key=settings.api_key.get_secret_value(),
            refusals=engine.client_errors,
        )
    # Added last, so it runs first: even a refused request gets its id.
    app.add_middleware(
        RequestMiddleware,
        answered=engine.http_requests,
        guard=BrowserGuard(settings.allowed_hosts),
        refusals=engine.client_errors,
    )
    _install_error_handlers(app)
    openapi.install(app, settings)

    # /infer first and straight on the app: FastAPI matches routes in order and descends into
    # each included router, which cost about 20 us a request before /infer was reached. And a
    # plain Starlette route: the handler reads and validates its own body, so FastAPI's
    # dependency solving (about 40 us a request) would buy it nothing. openapi.py documents it.
    app.router.routes.append(PlainRoute("/infer", infer, methods=["POST"]))
    app.openapi_url = "/openapi.json"
    app.setup()  # /openapi.json, /docs and /redoc, after /infer
    app.include_router(router)
    app.include_router(jobs_router)
    app.include_router(openai_router)
    app.include_router(responses_router)
    if settings.playground:
        app.include_router(playground_router)
    return app

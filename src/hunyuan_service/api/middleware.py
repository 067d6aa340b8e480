"""ASGI middleware: request ids and the browser guard on every request, and optional API keys on
all but the probes."""

from __future__ import annotations

import hmac
import itertools
import json
import re
import uuid
from collections import Counter
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hunyuan_service.api.headers import request_headers
from hunyuan_service.api.playground import PLAYGROUND_PATHS
from hunyuan_service.errors import (
    BadRequest,
    Forbidden,
    ServiceError,
    Unauthorized,
    error_body,
)
from hunyuan_service.media import host_allowed

PROBE_PATHS = frozenset({"/health", "/ready"})
OPEN_PATHS = PROBE_PATHS | PLAYGROUND_PATHS
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` or `X-API-Key: <key>`, compared in constant time.

    Pure ASGI, so a refused request costs no routing, no body read and no dependency resolution.
    """

    def __init__(
        self, app: ASGIApp, api_key: str, refusals: Counter[tuple[int, str]] | None = None
    ) -> None:
        self.app = app
        self.key = api_key.encode()
        self.refusals = refusals if refusals is not None else Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = request_headers(scope)
        given = headers.get(b"x-api-key", b"")
        authorization = headers.get(b"authorization", b"")
        if authorization[:7].lower() == b"bearer ":
            given = authorization[7:].strip()
        if given and hmac.compare_digest(given, self.key):
            await self.app(scope, receive, send)
            return
        error = Unauthorized(
            "missing or wrong API key; send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        )
        self.refusals[(error.status_code, error.code)] += 1
        await send_error(scope, send, error, [(b"www-authenticate", b"Bearer")])


async def send_error(
    scope: Scope, send: Send, error: ServiceError, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Answers with the error body from middleware, before any routing."""
    request_id = scope.get("state", {}).get("request_id")
    body = json.dumps(error_body(error, request_id)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BrowserGuard:
    """Stops what a web page in a visitor's browser could make that browser send here.

    - A state-changing request (anything but GET, HEAD, OPTIONS) whose `Origin` is not this
      service is refused with 403: a cross-site form or fetch would otherwise run jobs, since
      browsers send simple POSTs (text/plain, form-encoded, multipart) without asking first.
      Clients that are not browsers send no `Origin` and are not affected.
    - With ALLOWED_HOSTS set, a `Host` header outside it is refused with 400 (DNS rebinding
      makes a hostile name point here, and the browser then calls it same-origin). The probes,
      which kubelet sends to the pod's IP, are exempt.
    """

    def __init__(self, allowed_hosts: list[str]) -> None:
        self.allowed_hosts = allowed_hosts

    def refusal(self, scope: Scope, headers: dict[bytes, bytes]) -> ServiceError | None:
        """The error to answer `scope` with, or None to let it through."""
        host = headers.get(b"host", b"").decode("latin-1").lower()
        if self.allowed_hosts and scope["path"] not in PROBE_PATHS:
            name = host.rsplit(":", 1)[0].strip("[]") if host else ""
            if not host_allowed(name, self.allowed_hosts):
                return BadRequest(f"Host {host!r} is not in ALLOWED_HOSTS", code="host_not_allowed")
        origin = headers.get(b"origin")
        if origin is not None and scope["method"] not in SAFE_METHODS:
            given = origin.decode("latin-1").lower()
            # Behind a proxy that rewrites Host, the public name comes as X-Forwarded-Host; a
            # cross-site page cannot set that header without a CORS preflight, never granted.
            forwarded = headers.get(b"x-forwarded-host", b"").decode("latin-1").lower()
            if given.split("://", 1)[-1] not in (host, forwarded.split(",")[0].strip()):
                return Forbidden(
                    f"cross-origin request refused: Origin {given!r} is not this service",
                    code="cross_origin",
                )
        return None


_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestMiddleware:
    """Every request's first stop, in one pure-ASGI layer (each layer costs every request):

    - gives it an id (the client's X-Request-ID if sane) and echoes it back;
    - refuses what `BrowserGuard` refuses, before any routing;
    - counts each answer in `answered` by (method, route template, status) for /metrics.

    Pure ASGI rather than `@app.middleware`, which would wrap every response in extra tasks.
    """

    def __init__(
        self,
        app: ASGIApp,
        answered: Counter[tuple[str, str, int]],
        guard: BrowserGuard,
        refusals: Counter[tuple[int, str]] | None = None,
    ) -> None:
        self.app = app
        self.answered = answered
        self.guard = guard
        self.refusals = refusals if refusals is not None else Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = request_headers(scope)
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if given and _SAFE_ID.match(given) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode("latin-1"))

        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            error = self.guard.refusal(scope, headers)
            if error is None:
                await self.app(scope, receive, send_with_id)
            else:
                self.refusals[(error.status_code, error.code)] += 1
                await send_error(scope, send_with_id, error)
        finally:
            # The route template, never the raw path: job ids must not become label values.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.answered[(scope["method"], route, status)] += 1


_ID_PREFIX = uuid.uuid4().hex[:12]
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """A unique request id: a random per-process prefix plus a counter.

    uuid4() reads os.urandom, which took ~100 microseconds per call on the development VMs; that
    is a third of a bare FastAPI request. Request ids need to be unique, not secret; job ids,
    which grant access to a result, are random (`engine.new_job_id`).
    """
    return f"{_ID_PREFIX}{next(_id_counter):012x}"

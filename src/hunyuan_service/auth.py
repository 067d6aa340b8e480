"""Optional API-key authentication for every route except the health probes."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from hunyuan_service.errors import Unauthorized, error_body

OPEN_PATHS = frozenset({"/health", "/ready"})


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` or `X-API-Key: <key>`, compared in constant time.

    Pure ASGI, so a refused request costs no routing, no body read and no dependency resolution.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
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
        request_id = scope.get("state", {}).get("request_id")
        body = json.dumps(error_body(error, request_id)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

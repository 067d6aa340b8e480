"""What route handlers take from the app: the engine, and the request's id."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from hunyuan_service.api.middleware import new_request_id
from hunyuan_service.engine.engine import Engine


async def get_engine(request: Request) -> Engine:
    # async on purpose: FastAPI runs a plain `def` dependency in a thread pool, which costs two
    # thread hops on every request.
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


def request_id_of(request: Request) -> str:
    # The scope's state dict directly: `request.state` builds a wrapper object on first use.
    return request.scope.get("state", {}).get("request_id") or new_request_id()

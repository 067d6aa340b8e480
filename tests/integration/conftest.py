"""Fixtures for integration tests: the real app on a real socket, with fake models."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from hunyuan_service.api.app import create_app
from tests.conftest import LiveServer
from tests.fakes import FakeImageModel, fake_settings


@pytest.fixture
def serve() -> Iterator[Any]:
    """`serve(model, **settings)` starts the app on a free port and returns its URL."""
    servers: list[LiveServer] = []

    def start(model: FakeImageModel, **settings: Any) -> str:
        app = create_app(fake_settings(**settings), model=model)
        server = LiveServer(app).__enter__()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.__exit__()

"""Fixtures for integration tests: the real app on a real socket, with fake models."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from hunyuan_service.api.app import create_app
from tests.conftest import LiveServer
from tests.fakes import FakeImageModel, fake_settings


class Servers:
    """`serve(model, **settings)` starts the app on a free port and returns its URL;
    `serve.stop(url)` ends that one (its lifespan runs out), as a process exit would."""

    def __init__(self) -> None:
        self.running: dict[str, LiveServer] = {}

    def __call__(self, model: FakeImageModel, **settings: Any) -> str:
        app = create_app(fake_settings(**settings), model=model)
        server = LiveServer(app).__enter__()
        self.running[server.url] = server
        return server.url

    def stop(self, url: str) -> None:
        self.running.pop(url).__exit__()


@pytest.fixture
def serve() -> Iterator[Servers]:
    servers = Servers()
    yield servers
    for url in list(servers.running):
        servers.stop(url)

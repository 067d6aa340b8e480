"""End-to-end fixtures: the tiny real models, loaded through the real `from_pretrained` path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hunyuan_service.app import create_app
from hunyuan_service.settings import Settings


def tiny_settings(model_type: str, cache: Path, **overrides: object) -> Settings:
    return Settings(
        _env_file=None,
        model_type=model_type,
        model_id="tiny",
        device="cpu",
        cache_dir=cache,
        **overrides,
    )


@pytest.fixture(scope="session")
def flux_client(tiny_cache: Path) -> Iterator[TestClient]:
    app = create_app(tiny_settings("text2image", tiny_cache))
    with TestClient(app) as client:
        yield client

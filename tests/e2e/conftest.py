"""End-to-end fixtures: the tiny real models, loaded through the real `from_pretrained` path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hunyuan_service.api.app import create_app
from hunyuan_service.settings import Settings


def tiny_settings(model_type: str, cache: Path, **overrides: Any) -> Settings:
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


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("allowed-media")


@pytest.fixture(scope="session")
def vl_client(tiny_cache: Path) -> Iterator[TestClient]:
    """image2text with the default, strict media policy: no URLs, no local paths."""
    app = create_app(tiny_settings("image2text", tiny_cache, max_input_images=3))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="session")
def vl_open_client(tiny_cache: Path, media_dir: Path) -> Iterator[TestClient]:
    """image2text where the operator allowed a local folder and the loopback host 127.0.0.1."""
    settings = tiny_settings(
        "image2text",
        tiny_cache,
        allowed_local_media_dir=media_dir,
        allowed_media_domains=["127.0.0.1"],
        allow_private_media_addresses=True,
        max_image_bytes=200_000,
        max_body_bytes=1_000_000,
        media_fetch_timeout_s=2,
    )
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="session")
def flux(tiny_cache: Path) -> Any:
    """The tiny FLUX model itself, loaded once, for tests that call it directly."""
    from hunyuan_service.models.flux import FluxModel

    model = FluxModel(tiny_settings("text2image", tiny_cache))
    model.load()
    return model


@pytest.fixture(scope="session")
def qwen(tiny_cache: Path) -> Any:
    """The tiny Qwen2.5-VL model itself, loaded once, for tests that call it directly."""
    from hunyuan_service.models.qwen_vl import QwenVLModel

    model = QwenVLModel(tiny_settings("image2text", tiny_cache))
    model.load()
    return model

"""Schemathesis against the running service, per MODEL_TYPE: the OpenAPI document describes the
real API. The bar: no 5xx (but the documented 503 and 504), no response outside the document
(status, content type, body schema), and 405s that carry `Allow`.

A fake model answers at once, so the cases exercise the HTTP layer; examples are bounded and
derandomized (one fixed sequence per operation), so CI runs the same cases every time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from hunyuan_service.api.app import create_app
from tests.conftest import LiveServer
from tests.fakes import FakeImageModel, fake_settings

pytestmark = pytest.mark.slow


@schemathesis.check
def no_server_error(ctx: Any, response: Any, case: Any) -> None:
    """A 5xx fails, except the documented 503 (not admitted) and 504 (a deadline the request
    itself may set, e.g. `timeout_s` of 5e-324)."""
    if response.status_code >= 500 and response.status_code not in (503, 504):
        raise AssertionError(f"server error {response.status_code}: {response.text[:300]}")


CHECKS = [
    no_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def app_for(model_type: str) -> Any:
    model = FakeImageModel(steps=1, step_s=0.0)
    model.model_type = model_type  # type: ignore[misc]
    return create_app(fake_settings(model_type=model_type, max_queue_size=64), model)


APPS = {kind: app_for(kind) for kind in ("text2image", "image2text")}
text2image = schemathesis.openapi.from_dict(APPS["text2image"].openapi())
image2text = schemathesis.openapi.from_dict(APPS["image2text"].openapi())


@pytest.fixture(scope="module")
def text2image_url() -> Iterator[str]:
    with LiveServer(APPS["text2image"]) as server:
        yield server.url


@pytest.fixture(scope="module")
def image2text_url() -> Iterator[str]:
    with LiveServer(APPS["image2text"]) as server:
        yield server.url


FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


@text2image.parametrize()
@FUZZ
def test_text2image_api_matches_its_document(case: Any, text2image_url: str) -> None:
    case.call_and_validate(base_url=text2image_url, checks=CHECKS)


@image2text.parametrize()
@FUZZ
def test_image2text_api_matches_its_document(case: Any, image2text_url: str) -> None:
    case.call_and_validate(base_url=image2text_url, checks=CHECKS)


def test_each_document_describes_only_its_model_types_api() -> None:
    t2i, i2t = (APPS[kind].openapi() for kind in ("text2image", "image2text"))
    assert "/v1/images/generations" in t2i["paths"]
    edits = t2i["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert edits["multipart/form-data"]["schema"]["properties"]["mask"]["format"] == "binary"
    assert "/v1/images/edits" not in i2t["paths"]
    assert "/v1/loras" in t2i["paths"]
    assert "/v1/chat/completions" not in t2i["paths"]
    assert "/v1/chat/completions" in i2t["paths"]
    assert "/v1/responses" in i2t["paths"]
    assert "/v1/responses" not in t2i["paths"]
    assert "/v1/images/generations" not in i2t["paths"]
    t2i_infer, i2t_infer = t2i["paths"]["/infer"]["post"], i2t["paths"]["/infer"]["post"]
    assert list(t2i_infer["requestBody"]["content"]) == ["application/json"]
    assert set(i2t_infer["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert (
        "width" in t2i_infer["requestBody"]["content"]["application/json"]["schema"]["properties"]
    )
    i2t_fields = i2t_infer["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"images", "videos", "fps", "max_frames"} <= set(i2t_fields)
    t2i_fields = t2i_infer["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"image", "mask", "strength", "n"} <= set(t2i_fields)
    assert "image/png" in t2i_infer["responses"]["200"]["content"]
    assert "image/png" not in i2t_infer["responses"]["200"]["content"]
    for document in (t2i, i2t):
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                if method == "post":
                    assert "requestBody" in operation, path
                    retry = operation["responses"]["503"]["headers"]
                    assert "Retry-After" in retry, path
                    assert "422" in operation["responses"], path


def test_405_names_every_method_of_the_path(text2image_url: str) -> None:
    import httpx

    for method, path, allowed in (
        ("PUT", "/infer", "POST"),
        ("PATCH", "/v1/jobs/some-id", "DELETE, GET"),
        ("POST", "/health", "GET, HEAD"),
    ):
        reply = httpx.request(method, f"{text2image_url}{path}")
        assert reply.status_code == 405, (method, path)
        assert reply.headers["allow"] == allowed
        assert reply.json()["error"]["code"] == "http_error"
        for listed in allowed.split(", "):  # each method named is one that is served
            assert httpx.request(listed, f"{text2image_url}{path}").status_code != 405

"""What /infer answers with, by the Accept header: JSON, raw image bytes, SSE, or a 406."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from hunyuan_service.api.app import create_app
from tests.fakes import FakeImageModel, FakeModel, fake_settings

BODY = {"prompt": "x", "width": 64, "height": 64, "output_format": "webp"}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = fake_settings(request_timeout_s=60)
    with TestClient(create_app(settings, FakeImageModel())) as client:
        yield client


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("", "application/json"),
        ("*/*", "application/json"),
        ("application/json", "application/json"),
        ("image/png", "image/png"),  # an explicit image type wins over output_format
        ("image/*", "image/webp"),  # any image: the one output_format names
        ("image/png;q=0, application/json", "application/json"),
        ("application/json;q=0.5, image/jpeg;q=0.9", "image/jpeg"),
        ("text/event-stream", "text/event-stream"),
    ],
)
def test_accept_picks_the_answer(client: TestClient, accept: str, content_type: str) -> None:
    response = client.post("/infer", json=BODY, headers={"Accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == content_type


@pytest.mark.parametrize("accept", ["image/gif", "text/html", "image/png;q=0", "*/*;q=0"])
def test_nothing_acceptable_is_a_406_naming_what_can_be_sent(
    client: TestClient, accept: str
) -> None:
    response = client.post("/infer", json=BODY, headers={"Accept": accept})
    assert response.status_code == 406
    message = response.json()["error"]["message"]
    assert message.startswith(f"cannot answer with any of Accept: {accept!r}")
    assert "image/png" in message


def test_image2text_refuses_an_image_accept() -> None:
    settings = fake_settings(model_type="image2text")
    with TestClient(create_app(settings, FakeModel(settings))) as client:
        response = client.post("/infer", json={"prompt": "x"}, headers={"Accept": "image/png"})
    assert response.status_code == 406
    assert "image/png" not in response.json()["error"]["message"].split("sends", 1)[1]


def test_a_timeout_over_the_server_limit_is_a_422_not_a_silent_clamp(client: TestClient) -> None:
    response = client.post("/infer", json={**BODY, "timeout_s": 61})
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["param"], error["message"]) == (
        "timeout_s",
        "timeout_s: is 61 s; at most REQUEST_TIMEOUT_S (60 s) is allowed",
    )
    assert client.post("/infer", json={**BODY, "timeout_s": 60}).status_code == 200

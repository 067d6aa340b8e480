"""SSE on /infer through the tiny models: event order, progress counts, tokens, errors."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.images import data_uri, png_bytes
from tests.sse import parse_sse


def names(events: list) -> list[str]:
    return [name for name, _ in events if name != "comment"]


@pytest.mark.parametrize("trigger", ["body", "accept"])
def test_text2image_streams_progress_up_to_the_total_then_the_result(
    flux_client: TestClient, trigger: str
) -> None:
    body = {"prompt": "a fox", "width": 64, "height": 48 + 16, "num_inference_steps": 5}
    headers = {}
    if trigger == "body":
        body["stream"] = True
    else:
        headers["Accept"] = "text/event-stream"
    response = flux_client.post("/infer", json=body, headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert names(events) == ["queued", "started"] + ["progress"] * 5 + ["result"]
    assert events[0][1]["position"] >= 1
    progress = [data for name, data in events if name == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5]
    assert {p["total"] for p in progress} == {5}
    result = events[-1][1]
    image = Image.open(io.BytesIO(base64.b64decode(result["image_base64"])))
    assert image.size == (64, 64)
    assert set(result) == {"image_base64", "format", "width", "height", "seed", "timings"}


def test_image2text_streams_tokens_that_add_up_to_the_result(vl_client: TestClient) -> None:
    body = {
        "prompt": "Describe",
        "images": [data_uri(png_bytes())],
        "max_new_tokens": 6,
        "stream": True,
    }
    events = parse_sse(vl_client.post("/infer", json=body).text)
    assert names(events)[:2] == ["queued", "started"]
    assert names(events)[-1] == "result"
    assert set(names(events)[2:-1]) == {"token"}
    streamed = "".join(data["text"] for name, data in events if name == "token")
    assert streamed == events[-1][1]["text"]
    assert events[-1][1]["usage"]["completion_tokens"] == 6


def test_errors_before_admission_are_plain_http_errors(flux_client: TestClient) -> None:
    response = flux_client.post("/infer", json={"prompt": "x", "width": 65, "stream": True})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "width"


def test_deadline_during_a_stream_arrives_as_an_error_event(flux_client: TestClient) -> None:
    body = {
        "prompt": "x",
        "width": 512,
        "height": 512,
        "num_inference_steps": 100,
        "timeout_s": 0.3,
        "stream": True,
    }
    events = parse_sse(flux_client.post("/infer", json=body).text)
    assert names(events)[-1] == "error"
    error = events[-1][1]["error"]
    assert error["code"] == "deadline_exceeded"
    assert error["request_id"]

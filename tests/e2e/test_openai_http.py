"""The OpenAI-compatible routes and API keys, in-process: shapes, stop sequences, auth."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hunyuan_service.api.app import create_app
from tests.e2e.conftest import tiny_settings
from tests.images import data_uri, encoded
from tests.sse import parse_sse


def test_models_lists_the_model_id(vl_client: TestClient) -> None:
    body = vl_client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny"]
    assert 0 < body["data"][0]["created"] <= time.time()  # when the service started
    # One model by its id (the SDK's models.retrieve): the same entry, or a 404 naming it.
    assert vl_client.get("/v1/models/tiny").json() == body["data"][0]
    # Ids may hold a slash (org/name): the whole rest of the path is the id.
    missing = vl_client.get("/v1/models/Qwen/Qwen2.5-VL-7B-Instruct")
    assert missing.status_code == 404
    assert missing.json()["error"]["param"] == "model"
    assert "'Qwen/Qwen2.5-VL-7B-Instruct' is not served here" in missing.json()["error"]["message"]


def test_images_endpoint_refused_on_image2text(vl_client: TestClient) -> None:
    response = vl_client.post("/v1/images/generations", json={"prompt": "x"})
    assert response.status_code == 404
    assert "/v1/chat/completions" in response.json()["error"]["message"]


def test_stop_sequence_cuts_streamed_and_plain_text_alike(vl_client: TestClient) -> None:
    base = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 12}
    full = vl_client.post("/v1/chat/completions", json=base).json()["choices"][0]["message"]
    text = full["content"]
    assert len(text) >= 4
    stop = text[2:4]
    expected = text[: text.index(stop)]
    plain = vl_client.post("/v1/chat/completions", json={**base, "stop": [stop]}).json()
    assert plain["choices"][0]["message"]["content"] == expected
    streamed = vl_client.post("/v1/chat/completions", json={**base, "stop": stop, "stream": True})
    events = parse_sse(streamed.text)
    assert events[-1] == ("message", "[DONE]")
    pieces = [
        e[1]["choices"][0]["delta"].get("content", "")
        for e in events[:-1]
        if e[0] == "message" and e[1]["choices"]
    ]
    assert "".join(pieces) == expected


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000},
            "max_tokens",
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
            "logprobs",
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "frobnicate": 1},
            "frobnicate",
        ),
        (  # MAX_PROMPT_CHARS (4000) counts the text of every message together
            {"model": "tiny", "messages": [{"role": "user", "content": "x" * 2500}] * 2},
            "messages",
        ),
    ],
)
def test_chat_validation_is_400_naming_the_field(
    vl_client: TestClient, body: dict, param: str
) -> None:
    response = vl_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


@pytest.fixture(scope="module")
def locked(tiny_cache: Path) -> Iterator[TestClient]:
    settings = tiny_settings("text2image", tiny_cache, api_key="s3cret")
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_probes_need_no_key(locked: TestClient, path: str) -> None:
    assert locked.get(path).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cre"}, {"Authorization": "s3cret"}],
)
def test_every_other_route_needs_the_key(locked: TestClient, headers: dict) -> None:
    for method, path in [
        ("post", "/infer"),
        ("get", "/metrics"),
        ("get", "/v1/models"),
        ("post", "/v1/images/generations"),
        ("post", "/v1/responses"),
        ("get", "/docs"),
    ]:
        response = getattr(locked, method)(path, headers=headers)
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer s3cret"}, {"X-API-Key": "s3cret"}])
def test_either_header_carries_the_key(locked: TestClient, headers: dict) -> None:
    body = {"prompt": "x", "width": 64, "height": 64}
    assert locked.post("/infer", json=body, headers=headers).status_code == 200


HELLO: dict[str, Any] = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "go"}],
    "max_tokens": 12,
}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("logit_bias", {"50256": -100}),
        ("frequency_penalty", 0.5),
        ("presence_penalty", -1.0),
    ],
)
def test_unsupported_sampling_fields_are_refused_naming_the_field(
    vl_client: TestClient, field: str, value: object
) -> None:
    response = vl_client.post("/v1/chat/completions", json={**HELLO, field: value})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field
    assert error["message"].startswith(f"{field}: ")


def test_fields_that_ask_for_nothing_unsupported_are_accepted_and_change_nothing(
    vl_client: TestClient,
) -> None:
    plain = vl_client.post("/v1/chat/completions", json=HELLO).json()
    extras = {
        "user": "alice",
        "metadata": {"ticket": "42"},
        "store": False,
        "logit_bias": {},
        "frequency_penalty": 0,
        "presence_penalty": 0,
        # Without tools there is nothing to call: these ask for nothing either.
        "tool_choice": "none",
        "parallel_tool_calls": True,
    }
    with_extras = vl_client.post("/v1/chat/completions", json={**HELLO, **extras})
    assert with_extras.status_code == 200
    assert with_extras.json()["choices"] == plain["choices"]  # greedy: the same answer


@pytest.mark.parametrize(
    ("stop", "says"),
    [(["a", "b", "c", "d", "e"], "at most 4 stop sequences are allowed (got 5)"), ("", "empty")],
)
def test_a_refused_stop_says_what_is_wrong_with_it(
    vl_client: TestClient, stop: object, says: str
) -> None:
    response = vl_client.post("/v1/chat/completions", json={**HELLO, "stop": stop})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stop"
    assert says in response.json()["error"]["message"]


def test_a_developer_message_is_read_as_the_system_message(vl_client: TestClient) -> None:
    # OpenAI's newer name for the system role; the SDK and agent frameworks send it.
    def ask(role: str) -> dict:
        first = {"role": role, "content": "Answer in one word."}
        response = vl_client.post(
            "/v1/chat/completions", json={**HELLO, "messages": [first, *HELLO["messages"]]}
        )
        assert response.status_code == 200, response.text
        return response.json()

    system, developer, plain = (
        ask("system"),
        ask("developer"),
        vl_client.post("/v1/chat/completions", json=HELLO).json(),
    )
    assert developer["choices"] == system["choices"]  # greedy: the same prompt, the same answer
    assert developer["usage"] == system["usage"]
    # The instruction is in the prompt: dropped, Qwen's template would put its default system
    # message there instead, as it does for the plain request.
    assert developer["usage"]["prompt_tokens"] != plain["usage"]["prompt_tokens"]


def test_max_completion_tokens_bounds_the_answer_before_max_tokens(vl_client: TestClient) -> None:
    full = vl_client.post("/v1/chat/completions", json=HELLO).json()
    assert full["usage"]["completion_tokens"] > 2  # the precondition: a longer answer
    short = vl_client.post("/v1/chat/completions", json={**HELLO, "max_completion_tokens": 2})
    assert short.status_code == 200
    body = short.json()
    assert body["usage"]["completion_tokens"] == 2
    assert body["choices"][0]["finish_reason"] == "length"
    two = vl_client.post("/v1/chat/completions", json={**HELLO, "max_tokens": 2}).json()
    assert body["choices"] == two["choices"]  # the same answer as max_tokens=2 gives


def test_mm_processor_kwargs_bound_each_images_resolution(vl_client: TestClient) -> None:
    """vLLM's way to ask for a resolution: a smaller max_pixels costs fewer prompt tokens."""
    image = data_uri(encoded(Image.new("RGB", (640, 480), (40, 90, 160)), "PNG"))
    content = [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2}

    def prompt_tokens(**extra: Any) -> int:
        response = vl_client.post("/v1/chat/completions", json={**body, **extra})
        assert response.status_code == 200, response.text
        return int(response.json()["usage"]["prompt_tokens"])

    default = prompt_tokens()
    assert prompt_tokens(mm_processor_kwargs={"max_pixels": 56 * 56}) < default
    refused = vl_client.post(
        "/v1/chat/completions", json={**body, "mm_processor_kwargs": {"max_pixels": 10}}
    )
    assert refused.status_code == 400
    assert "max_pixels" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    ("content", "param", "problem"),
    [
        ([{"type": "image_url"}], "messages[0].content[0]", 'needs its "image_url" field'),
        ([{"type": "text", "text": "a"}, {"type": "text"}], "messages[0].content[1]", '"text"'),
        ([{"type": "video_url", "text": "a"}], "messages[0].content[0]", '"video_url" field'),
        ([{"type": "audio"}], "messages[0].content[0].type", "'text', 'image_url' or"),
    ],
)
def test_a_part_without_its_content_is_refused_naming_the_part(
    vl_client: TestClient, content: list[dict], param: str, problem: str
) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    response = vl_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    # The part's own problem only, not one for each form the content is not (text, list).
    assert error["message"].startswith(f"{param}: ")
    assert problem in error["message"]
    assert ";" not in error["message"], error["message"]


def test_an_image_part_beyond_qwens_aspect_ratio_is_refused_naming_the_part(
    vl_client: TestClient,
) -> None:
    image = data_uri(encoded(Image.new("RGB", (1000, 4), (40, 90, 160)), "PNG"))
    content = [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    response = vl_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 422, response.text  # as for any image it cannot take
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1].image_url"
    assert "1000x4 pixels" in error["message"]


def test_an_image_part_may_carry_its_own_pixel_bounds(vl_client: TestClient) -> None:
    """qwen-vl-utils' per-item `min_pixels`/`max_pixels`, on the part itself."""
    image = data_uri(encoded(Image.new("RGB", (640, 480), (40, 90, 160)), "PNG"))

    def send(part_extra: dict[str, Any], **extra: Any) -> Any:
        part = {"type": "image_url", "image_url": {"url": image}, **part_extra}
        content = [part, {"type": "text", "text": "What is it?"}]
        body = {"model": "tiny", "messages": [{"role": "user", "content": content}]}
        return vl_client.post("/v1/chat/completions", json={**body, "max_tokens": 2, **extra})

    def prompt_tokens(part_extra: dict[str, Any], **extra: Any) -> int:
        response = send(part_extra, **extra)
        assert response.status_code == 200, response.text
        return int(response.json()["usage"]["prompt_tokens"])

    small = prompt_tokens({"max_pixels": 56 * 56})
    assert small < prompt_tokens({})
    assert small == prompt_tokens({}, mm_processor_kwargs={"max_pixels": 56 * 56})
    for extra, field in (
        ({"max_pixels": 10}, "messages[0].content[0].max_pixels"),
        ({"min_pixels": 10**9}, "messages[0].content[0].min_pixels"),
    ):
        refused = send(extra)
        assert refused.status_code == 400, refused.text
        assert field in refused.json()["error"]["message"]
    text_part = {"type": "text", "text": "hi", "max_pixels": 5000}
    body = {"model": "tiny", "messages": [{"role": "user", "content": [text_part]}]}
    refused = vl_client.post("/v1/chat/completions", json=body)
    assert refused.status_code == 400
    assert "only image and video parts" in refused.json()["error"]["message"]

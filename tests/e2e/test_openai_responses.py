"""OpenAI's Responses API (`POST /v1/responses`) on the tiny Qwen model, in-process: the same
answers as the chat API, the stream event by event, and errors that name its own fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hunyuan_service.api.app import create_app
from tests.e2e.conftest import tiny_settings
from tests.images import data_uri, png_bytes
from tests.sse import parse_sse

IMAGE = data_uri(png_bytes())
# A conversation in both APIs' shapes: instructions, a question about an image, an earlier
# answer sent back, and a follow-up.
RESPONSES_INPUT: list[dict[str, Any]] = [
    {
        "role": "user",
        "content": [
            {"type": "input_text", "text": "What is in this image?"},
            {"type": "input_image", "image_url": IMAGE, "detail": "auto"},
        ],
    },
    {
        "id": "msg_earlier",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "A square.", "annotations": []}],
    },
    {"role": "user", "content": "What colour?"},
]
CHAT_MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Answer briefly."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": IMAGE}},
        ],
    },
    {"role": "assistant", "content": "A square."},
    {"role": "user", "content": "What colour?"},
]


def respond(client: TestClient, **fields: Any) -> Any:
    body = {"model": "tiny", "instructions": "Answer briefly.", "input": RESPONSES_INPUT, **fields}
    return client.post("/v1/responses", json=body)


@pytest.mark.parametrize("max_tokens", [3, 40])
def test_a_response_answers_as_the_chat_api_does(vl_client: TestClient, max_tokens: int) -> None:
    response = respond(vl_client, max_output_tokens=max_tokens)
    assert response.status_code == 200, response.text
    body = response.json()
    chat = vl_client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": CHAT_MESSAGES, "max_tokens": max_tokens},
    ).json()
    choice = chat["choices"][0]
    # Greedy by default in both: the same conversation, the same answer.
    [message] = body["output"]
    assert message["type"] == "message"
    assert message["role"] == "assistant"
    assert [part["type"] for part in message["content"]] == ["output_text"]
    assert message["content"][0]["text"] == choice["message"]["content"]
    assert body["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert body["usage"]["output_tokens"] == chat["usage"]["completion_tokens"]
    assert body["usage"]["total_tokens"] == chat["usage"]["total_tokens"]
    finished = {"stop": ("completed", None), "length": ("incomplete", "max_output_tokens")}
    status, reason = finished[choice["finish_reason"]]
    assert (body["status"], message["status"]) == (status, status)
    assert (body["incomplete_details"] or {}).get("reason") == reason
    assert body["object"] == "response"
    assert body["id"].startswith("resp_")
    assert body["instructions"] == "Answer briefly."
    assert body["max_output_tokens"] == max_tokens


def test_both_lengths_occur(vl_client: TestClient) -> None:
    # The precondition of the test above: one of its two budgets cuts the answer, one does not.
    statuses = {respond(vl_client, max_output_tokens=n).json()["status"] for n in (3, 40)}
    assert statuses == {"incomplete", "completed"}


def test_the_stream_carries_the_answer_event_by_event(vl_client: TestClient) -> None:
    whole = respond(vl_client, max_output_tokens=40).json()
    streamed = respond(vl_client, max_output_tokens=40, stream=True)
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [(name, data) for name, data in parse_sse(streamed.text) if name != "comment"]
    names = [name for name, _ in events]
    deltas = names.count("response.output_text.delta")
    assert deltas >= 1
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{whole['status']}",
    ]
    assert [data["type"] for _, data in events] == names
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    text = whole["output"][0]["content"][0]["text"]
    by_name = dict(events)
    assert "".join(d["delta"] for n, d in events if n == "response.output_text.delta") == text
    assert by_name["response.output_text.done"]["text"] == text
    assert by_name["response.created"]["response"]["status"] == "in_progress"
    final = by_name[f"response.{whole['status']}"]["response"]
    [item] = final["output"]
    assert {k: v for k, v in item.items() if k != "id"} == {
        k: v for k, v in whole["output"][0].items() if k != "id"
    }
    assert by_name["response.output_item.done"]["item"] == item
    assert final["usage"] == whole["usage"]
    assert final["id"] == by_name["response.created"]["response"]["id"]
    assert item["id"] == by_name["response.output_item.added"]["item"]["id"]


def test_a_string_input_is_one_user_message(vl_client: TestClient) -> None:
    plain = vl_client.post(
        "/v1/responses", json={"model": "tiny", "input": "Hello", "max_output_tokens": 8}
    ).json()
    chat = vl_client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8},
    ).json()
    assert plain["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]
    assert plain["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]


def test_a_json_schema_format_constrains_the_answer(vl_client: TestClient) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    text_format = {"type": "json_schema", "name": "count", "schema": schema, "strict": True}
    response = respond(vl_client, max_output_tokens=3, text={"format": text_format})
    assert response.status_code == 200, response.text
    body = response.json()
    # The tiny tokenizer spells one character per token: the only property, forced.
    assert body["output"][0]["content"][0]["text"] == '{"n'
    assert body["text"]["format"] == text_format


@pytest.mark.parametrize(
    ("fields", "status", "param", "words"),
    [
        # The chat API's checks, named with this API's fields.
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            403,
            "input[0].content[0].image_url",
            "server-local paths are disabled",
        ),
        ({"input": "<|im_start|>system"}, 400, "input", "control token"),
        ({"input": "x" * 5000}, 400, "input", "at most 4000"),
        ({"max_output_tokens": 10**6}, 400, "max_output_tokens", "at most"),
        (
            {"text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "x"}}}},
            400,
            "text.format",
            "JSON schema",
        ),
        # This API's own.
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            400,
            "input[0].content[0].file_id",
            "file_id",
        ),
        ({"previous_response_id": "resp_1"}, 400, "previous_response_id", "whole conversation"),
        ({"truncation": "auto"}, 400, "truncation", "disabled"),
        ({"text": {"verbosity": "high"}}, 400, "text.verbosity", "medium"),
        ({"frobnicate": 1}, 400, "frobnicate", "unknown field"),
        ({"model": "gpt-5"}, 404, "model", "not served here"),
    ],
)
def test_errors_name_the_responses_fields(
    vl_client: TestClient, fields: dict[str, Any], status: int, param: str, words: str
) -> None:
    response = respond(vl_client, **{"max_output_tokens": 4, **fields})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]
    assert "messages" not in error["message"]  # never the chat API's names


def test_fields_that_ask_for_nothing_unsupported_are_accepted(vl_client: TestClient) -> None:
    plain = respond(vl_client, max_output_tokens=6).json()
    defaults = {
        "store": False,
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "truncation": "disabled",
        "tools": [],
        "include": [],
        "reasoning": None,
        "metadata": {"ticket": "42"},
        "user": "alice",
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
    }
    response = respond(vl_client, max_output_tokens=6, **defaults)
    assert response.status_code == 200, response.text
    assert response.json()["output"][0]["content"] == plain["output"][0]["content"]
    assert response.json()["metadata"] == {"ticket": "42"}  # echoed back, as OpenAI does


def test_the_route_is_image2texts_only(flux_client: TestClient) -> None:
    response = flux_client.post("/v1/responses", json={"model": "tiny", "input": "hi"})
    assert response.status_code == 404
    assert "text2image" in response.json()["error"]["message"]


def test_a_job_that_fails_on_the_way_ends_the_stream_failed(tiny_cache: Path) -> None:
    # A deadline far shorter than the answer the schema forces: at least 1,900 tokens, one
    # character each with the tiny tokenizer.
    settings = tiny_settings("image2text", tiny_cache, request_timeout_s=0.2)
    long_text = {
        "type": "json_schema",
        "name": "essay",
        "schema": {"type": "string", "minLength": 1900},
    }
    body = {
        "model": "tiny",
        "input": "Write.",
        "max_output_tokens": 2000,
        "text": {"format": long_text},
        "stream": True,
    }
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/responses", json=body)
    assert response.status_code == 200
    events = [(name, data) for name, data in parse_sse(response.text) if name != "comment"]
    name, last = events[-1]
    assert name == last["type"] == "response.failed"
    failed = last["response"]
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "deadline_exceeded"
    [item] = failed["output"]  # what was streamed before it failed, and nothing else
    deltas = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert item["content"][0]["text"] == deltas
    assert item["status"] == "incomplete"
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))

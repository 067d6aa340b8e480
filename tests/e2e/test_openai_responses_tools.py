"""Tool calling on `/v1/responses` with the tiny random-weight Qwen: function tools in the
Responses API's flat shape, `function_call` items out, and `function_call` and
`function_call_output` items sent back; underneath, the chat API's tool calling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

from hunyuan_service.api.app import create_app
from tests.e2e.conftest import tiny_settings
from tests.e2e.test_tool_calls import CLOCK, SCHEMAS, WEATHER
from tests.sse import parse_sse

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Today's weather",
        "parameters": WEATHER,
    },
    {"type": "function", "name": "get_time", "parameters": CLOCK, "strict": True},
]
CHAT_TOOLS = [
    {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
    for tool in TOOLS
]
QUESTION = "Weather and time in Oslo?"


def respond(client: TestClient, **fields: Any) -> dict[str, Any]:
    body = {"model": "tiny", "input": QUESTION, "tools": TOOLS, "max_output_tokens": 400, **fields}
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def streamed(client: TestClient, **fields: Any) -> list[tuple[str, Any]]:
    """The events of the same request streamed, keep-alive comments left out."""
    body = {"model": "tiny", "input": QUESTION, "tools": TOOLS, "max_output_tokens": 400, **fields}
    response = client.post("/v1/responses", json={**body, "stream": True})
    assert response.status_code == 200, response.text
    return [(name, data) for name, data in parse_sse(response.text) if name != "comment"]


def chat(client: TestClient, **fields: Any) -> dict[str, Any]:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": QUESTION}],
        "tools": CHAT_TOOLS,
        "max_tokens": 400,
        **fields,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_required_call_is_a_function_call_item_as_the_chat_api_calls(
    vl_client: TestClient,
) -> None:
    body = respond(vl_client, tool_choice="required")
    expected = chat(vl_client, tool_choice="required")["choices"][0]["message"]["tool_calls"]
    assert body["status"] == "completed"
    assert [item["type"] for item in body["output"]] == ["function_call"] * len(expected)
    for item, call in zip(body["output"], expected, strict=True):
        assert (item["name"], item["arguments"]) == (
            call["function"]["name"],
            call["function"]["arguments"],
        )
        assert item["call_id"].startswith("call_")
        assert item["id"].startswith("fc_")
        assert item["status"] == "completed"
        jsonschema.validate(json.loads(item["arguments"]), SCHEMAS[item["name"]])
    assert body["tools"] == TOOLS
    assert body["tool_choice"] == "required"


def test_a_named_function_in_the_flat_shape(vl_client: TestClient) -> None:
    body = respond(
        vl_client, tool_choice={"type": "function", "name": "get_time"}, parallel_tool_calls=False
    )
    [item] = body["output"]
    assert item["name"] == "get_time"
    assert body["parallel_tool_calls"] is False


def test_calls_and_outputs_sent_back_read_as_the_chat_apis_conversation(
    vl_client: TestClient,
) -> None:
    calls = [
        ("call_a", "get_weather", '{"city": "Oslo", "unit": "celsius"}'),
        ("call_b", "get_time", '{"offset": 1}'),
    ]
    items: list[dict[str, Any]] = [
        {"role": "user", "content": QUESTION},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Looking.", "annotations": []}],
        },
        *[
            {
                "type": "function_call",
                "call_id": c,
                "name": n,
                "arguments": a,
                "id": f"fc_{c}",
                "status": "completed",
            }
            for c, n, a in calls
        ],
        {"type": "function_call_output", "call_id": "call_a", "output": "-3 C"},
        {
            "type": "function_call_output",
            "call_id": "call_b",
            "output": [{"type": "input_text", "text": "09:14"}],
        },
    ]
    answered = respond(vl_client, input=items, tool_choice="none")
    messages = [
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": "Looking.",
            "tool_calls": [
                {"id": c, "type": "function", "function": {"name": n, "arguments": a}}
                for c, n, a in calls
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "-3 C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "09:14"},
    ]
    expected = chat(vl_client, messages=messages, tool_choice="none")
    assert answered["usage"]["input_tokens"] == expected["usage"]["prompt_tokens"]
    [message] = answered["output"]
    assert message["content"][0]["text"] == expected["choices"][0]["message"]["content"]


def test_a_streamed_call_comes_as_function_call_events(vl_client: TestClient) -> None:
    whole = respond(vl_client, tool_choice="required")
    events = streamed(vl_client, tool_choice="required")
    names = [name for name, _ in events]
    per_call = [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert names == [
        "response.created",
        "response.in_progress",
        *per_call * len(whole["output"]),
        "response.completed",
    ]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    final = events[-1][1]["response"]
    done = [data["item"] for name, data in events if name == "response.output_item.done"]
    assert done == final["output"]
    strip = lambda item: {k: v for k, v in item.items() if k not in ("id", "call_id")}  # noqa: E731
    assert [strip(item) for item in final["output"]] == [strip(item) for item in whole["output"]]
    deltas = [data for name, data in events if name == "response.function_call_arguments.delta"]
    assert [d["delta"] for d in deltas] == [item["arguments"] for item in final["output"]]
    assert [d["output_index"] for d in deltas] == list(range(len(deltas)))
    assert [d["item_id"] for d in deltas] == [item["id"] for item in final["output"]]
    assert final["usage"] == whole["usage"]


def test_a_streamed_answer_without_calls_keeps_the_text_events(vl_client: TestClient) -> None:
    whole = respond(vl_client, tool_choice="auto", max_output_tokens=30)
    events = streamed(vl_client, max_output_tokens=30)
    final = events[-1][1]["response"]
    # The tiny model's greedy answer here is text, not a call (the precondition of this test).
    assert [i["type"] for i in whole["output"]] == ["message"]
    without_id = [{k: v for k, v in item.items() if k != "id"} for item in whole["output"]]
    assert [{k: v for k, v in item.items() if k != "id"} for item in final["output"]] == without_id
    names = [name for name, _ in events]
    assert names[2:4] == ["response.output_item.added", "response.content_part.added"]
    text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert text == whole["output"][0]["content"][0]["text"]


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type", "'function'"),
        (
            {"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]},
            "tools[0].parameters",
            "an object",
        ),
        ({"tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "not among tools"),
        (
            {"tool_choice": "required", "text": {"format": {"type": "json_object"}}},
            "text.format",
            "must call a tool",
        ),
        (
            {
                "input": [
                    {"role": "user", "content": "x"},
                    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "[]"},
                ]
            },
            "input[1].arguments",
            "JSON text of an object",
        ),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id", "Field required"),
        (
            {
                "input": [
                    {
                        "type": "function_call",
                        "call_id": "c",
                        "name": "f",
                        "arguments": "[" * 5000 + "]" * 5000,
                    }
                ]
            },
            "input[0].arguments",
            "JSON text of an object",
        ),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]", "function_call_output"),
        (
            {
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [{"type": "input_image", "image_url": "data:,"}],
                    }
                ]
            },
            "input[0].output",
            "text",
        ),
    ],
)
def test_tool_errors_name_the_responses_fields(
    vl_client: TestClient, fields: dict[str, Any], param: str, words: str
) -> None:
    body = {"model": "tiny", "input": QUESTION, "tools": TOOLS, "max_output_tokens": 4, **fields}
    response = vl_client.post("/v1/responses", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]
    assert "messages" not in error["message"]


def test_a_call_that_fails_on_the_way_ends_the_stream_with_nothing_sent(tiny_cache: Path) -> None:
    # A deadline far shorter than the call the schema forces: ~1,900 one-character tokens.
    settings = tiny_settings("image2text", tiny_cache, request_timeout_s=0.2)
    long = {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 1900}},
        "required": ["text"],
    }
    tools = [{"type": "function", "name": "write", "parameters": long}]
    with TestClient(create_app(settings)) as client:
        body = {"model": "tiny", "input": QUESTION, "tools": tools, "tool_choice": "required"}
        response = client.post(
            "/v1/responses", json={**body, "max_output_tokens": 2000, "stream": True}
        )
    events = [(name, data) for name, data in parse_sse(response.text) if name != "comment"]
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.failed",
    ]
    failed = events[-1][1]["response"]
    assert failed["error"]["code"] == "deadline_exceeded"
    assert failed["output"] == []  # the call was held back whole, so nothing was sent

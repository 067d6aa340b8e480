"""`n` on /v1/chat/completions with the tiny Qwen: each choice a job of its own, choice i the
answer that `seed + i` gives alone, streamed by index, and a queue place for each, all or none."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from hunyuan_service.api.app import create_app
from hunyuan_service.api.openai_schemas import MAX_CHOICES
from tests.e2e.conftest import tiny_settings
from tests.integration.live import counter, wait_until
from tests.metrics import value
from tests.service_process import ServiceProcess, tiny_env
from tests.sse import parse_sse

ASK: dict[str, Any] = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Name a colour."}],
    "max_tokens": 12,
}


def chat(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json={**ASK, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_choices_are_one_answer_counted_once_for_the_prompt(vl_client: TestClient) -> None:
    one = chat(vl_client)
    three = chat(vl_client, n=3)
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert [c["message"] for c in three["choices"]] == [one["choices"][0]["message"]] * 3
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert three["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    assert three["usage"]["total_tokens"] == sum(
        three["usage"][k] for k in ("prompt_tokens", "completion_tokens")
    )


def test_each_sampled_choice_is_its_seeds_answer_alone(vl_client: TestClient) -> None:
    sampled = {"temperature": 1.0, "seed": 40}
    choices = chat(vl_client, n=3, **sampled)["choices"]
    alone = [chat(vl_client, temperature=1.0, seed=40 + i)["choices"][0] for i in range(3)]
    assert [c["message"] for c in choices] == [a["message"] for a in alone]
    assert [c["finish_reason"] for c in choices] == [a["finish_reason"] for a in alone]
    assert len({c["message"]["content"] for c in choices}) > 1  # the seeds do differ


def test_streamed_choices_carry_their_own_text_and_one_finish_each(vl_client: TestClient) -> None:
    fields = {"n": 2, "temperature": 1.0, "seed": 7}
    whole = chat(vl_client, **fields)
    response = vl_client.post(
        "/v1/chat/completions",
        json={**ASK, **fields, "stream": True, "stream_options": {"include_usage": True}},
    )
    events = parse_sse(response.text)
    assert events[-1] == ("message", "[DONE]")
    chunks = [data for name, data in events[:-1] if name == "message"]
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    for index, expected in enumerate(whole["choices"]):
        mine = [d for d in deltas if d["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(d["delta"].get("content") or "" for d in mine)
        assert text == expected["message"]["content"]
        finishes = [d["finish_reason"] for d in mine if d["finish_reason"]]
        assert finishes == [expected["finish_reason"]]
    assert {d["index"] for d in deltas} == {0, 1}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == whole["usage"]


def test_each_choice_of_a_required_call_makes_its_calls(vl_client: TestClient) -> None:
    clock = {
        "type": "object",
        "properties": {"offset": {"type": "integer", "minimum": -12, "maximum": 14}},
        "required": ["offset"],
        "additionalProperties": False,
    }
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": clock}}]
    body = chat(vl_client, n=2, tools=tools, tool_choice="required", max_tokens=200)
    for choice in body["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        names = {call["function"]["name"] for call in choice["message"]["tool_calls"]}
        assert names == {"get_time"}


@pytest.mark.parametrize("n", [0, MAX_CHOICES + 1])
def test_n_out_of_range_is_a_400(vl_client: TestClient, n: int) -> None:
    response = vl_client.post("/v1/chat/completions", json={**ASK, "n": n})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n"
    assert f"from 1 to {MAX_CHOICES}" in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def small_queue(tiny_cache: Path) -> Iterator[TestClient]:
    app = create_app(tiny_settings("image2text", tiny_cache, max_queue_size=3))
    with TestClient(app) as client:
        yield client


def test_more_choices_than_the_queue_holds_is_a_400_naming_the_setting(
    small_queue: TestClient,
) -> None:
    response = small_queue.post("/v1/chat/completions", json={**ASK, "n": 4})
    assert response.status_code == 400
    assert "MAX_QUEUE_SIZE" in response.json()["error"]["message"]


def test_choices_take_their_queue_places_all_or_none(small_queue: TestClient) -> None:
    engine = small_queue.app.state.engine  # type: ignore[attr-defined]
    with engine.reserve():  # another request holds one of the three places
        response = small_queue.post("/v1/chat/completions", json={**ASK, "n": 3})
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        # The two places the refused request found free were given back: two choices fit.
        assert len(chat(small_queue, n=2)["choices"]) == 2
    assert len(chat(small_queue, n=3)["choices"]) == 3


# An answer far longer than the test waits: a schema that forces ~2,000 one-character tokens.
LONG = {
    "max_tokens": 2000,
    "temperature": 1.0,
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "essay", "schema": {"type": "string", "minLength": 1990}},
    },
}


HANG_S = 120  # the waits' bound: it only catches a hang


@pytest.fixture(scope="module")
def qwen_process(tiny_cache: Path) -> Iterator[ServiceProcess]:
    env = tiny_env(tiny_cache, MODEL_TYPE="image2text", MAX_BATCH_SIZE="4")
    with ServiceProcess(env) as service:
        yield service


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_stops_every_choice(
    qwen_process: ServiceProcess, stream: bool
) -> None:
    gone = "cancelled_running_client_disconnected"
    before = counter(qwen_process.url, gone)
    body = json.dumps({**ASK, **LONG, "n": 3, "stream": stream}).encode()
    with socket.create_connection(("127.0.0.1", qwen_process.port)) as sock:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        # All three choices are running before the client leaves.
        wait_until(lambda: running_rows(qwen_process) == 3, timeout=HANG_S)
    wait_until(lambda: counter(qwen_process.url, gone) == before + 3, timeout=HANG_S)
    wait_until(lambda: running_rows(qwen_process) == 0, timeout=HANG_S)


def running_rows(service: ServiceProcess) -> int:
    return int(value(httpx.get(f"{service.url}/metrics").text, "hunyuan_running_jobs"))

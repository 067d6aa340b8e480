"""Tool calling on /v1/chat/completions with the tiny random-weight Qwen: its text is junk, yet
a required call is always a call of an offered function whose arguments fit its schema, and a
conversation with calls and results reads as Qwen's own format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

from hunyuan_service.api.tool_calls import DEFAULT_SYSTEM, tools_prompt
from hunyuan_service.api.tool_calls import Function as Spec
from tests.images import data_uri, png_bytes
from tests.sse import parse_sse

# Bounded strings and numbers: random weights never end a free one by choice (see
# test_structured_output.py), so the grammar has to close them within the token budget.
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"offset": {"type": "integer", "minimum": -12, "maximum": 14}},
    "required": ["offset"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Today's weather",
            "parameters": WEATHER,
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
ASK: dict[str, Any] = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Weather and time in Oslo?"}],
    "tools": TOOLS,
    "max_tokens": 400,
}
SAMPLING = [{}, {"temperature": 1.0, "seed": 5}, {"temperature": 1.5, "seed": 11}]


def chat(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json={**ASK, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def calls_of(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert all(call["type"] == "function" and call["id"].startswith("call_") for call in calls)
    assert len({call["id"] for call in calls}) == len(calls)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("sampling", SAMPLING)
def test_a_required_call_names_an_offered_function_with_arguments_that_fit(
    vl_client: TestClient, sampling: dict[str, Any]
) -> None:
    calls = calls_of(chat(vl_client, tool_choice="required", **sampling))
    assert len(calls) >= 1
    for name, arguments in calls:
        jsonschema.validate(arguments, SCHEMAS[name])


@pytest.mark.parametrize("sampling", SAMPLING)
def test_a_named_choice_calls_that_function_once_without_parallel_calls(
    vl_client: TestClient, sampling: dict[str, Any]
) -> None:
    for name in SCHEMAS:
        choice = {"type": "function", "function": {"name": name}}
        body = chat(vl_client, tool_choice=choice, parallel_tool_calls=False, **sampling)
        [(called, arguments)] = calls_of(body)
        assert called == name
        jsonschema.validate(arguments, SCHEMAS[name])


def test_a_streamed_call_is_the_call_of_the_same_request_unstreamed(vl_client: TestClient) -> None:
    plain = chat(vl_client, tool_choice="required")
    response = vl_client.post(
        "/v1/chat/completions", json={**ASK, "tool_choice": "required", "stream": True}
    )
    events = parse_sse(response.text)
    assert events[-1] == ("message", "[DONE]")
    deltas = [e[1]["choices"][0] for e in events[:-1]]
    assert [d["delta"].get("content") for d in deltas if d["delta"].get("content")] == []
    streamed = [call for d in deltas for call in d["delta"].get("tool_calls", [])]
    assert [c["index"] for c in streamed] == list(range(len(streamed)))
    expected = plain["choices"][0]["message"]["tool_calls"]
    assert [c["function"] for c in streamed] == [c["function"] for c in expected]
    assert deltas[-1]["finish_reason"] == "tool_calls"


def test_tool_choice_none_leaves_the_tools_out(vl_client: TestClient) -> None:
    bare = {key: value for key, value in ASK.items() if key != "tools"}
    without = vl_client.post("/v1/chat/completions", json=bare).json()
    none = chat(vl_client, tool_choice="none")
    assert none["choices"] == without["choices"]  # greedy: the same prompt, the same answer
    assert none["usage"] == without["usage"]


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_offered_tools_end_the_system_message_in_qwens_format(
    vl_client: TestClient, system: str | None
) -> None:
    """A chat with tools reads as the same chat without them whose system message (the
    template's default where it has none) ends with the tools' description: the same prompt
    tokens, the same greedy answer."""
    specs = [
        Spec(t["function"]["name"], t["function"].get("description"), t["function"]["parameters"])
        for t in TOOLS
    ]
    first = [] if system is None else [{"role": "system", "content": system}]
    offered = chat(vl_client, messages=[*first, *ASK["messages"]])
    written = {"role": "system", "content": (system or DEFAULT_SYSTEM) + tools_prompt(specs)}
    by_hand = chat(vl_client, messages=[written, *ASK["messages"]], tools=None)
    assert offered["usage"] == by_hand["usage"]
    assert offered["choices"] == by_hand["choices"]
    assert "<tools>" in written["content"]


def test_calls_and_results_sent_back_read_as_qwens_turns(vl_client: TestClient) -> None:
    arguments = {"city": "Oslo", "unit": "celsius"}
    conversation = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": data_uri(png_bytes((32, 32)))}}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(arguments)},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"offset": 1}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "09:14"}]},
    ]
    with_results = chat(vl_client, messages=conversation, tool_choice="none")
    written = [
        conversation[0],
        {
            "role": "assistant",
            "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
            '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
            '{"offset": 1}}\n</tool_call>',
        },
        {
            "role": "user",
            "content": "<tool_response>\n-3 C, snow\n</tool_response>\n"
            "<tool_response>\n09:14\n</tool_response>",
        },
    ]
    by_hand = chat(vl_client, messages=written, tools=None)
    assert with_results["usage"] == by_hand["usage"]
    assert with_results["choices"] == by_hand["choices"]


def test_beside_a_response_format_an_answer_calls_or_follows_the_schema(
    vl_client: TestClient,
) -> None:
    answer = {
        "type": "object",
        "properties": {"summary": {"type": "string", "maxLength": 12}},
        "required": ["summary"],
        "additionalProperties": False,
    }
    format_ = {"type": "json_schema", "json_schema": {"name": "a", "schema": answer}}
    for sampling in SAMPLING:
        choice = chat(vl_client, response_format=format_, **sampling)["choices"][0]
        if choice["finish_reason"] == "tool_calls":
            for call in choice["message"]["tool_calls"]:
                name = call["function"]["name"]
                jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])
        else:
            assert choice["finish_reason"] == "stop"
            jsonschema.validate(json.loads(choice["message"]["content"]), answer)


def test_a_call_cut_short_by_max_tokens_is_text(vl_client: TestClient) -> None:
    choice = chat(vl_client, tool_choice="required", max_tokens=8)["choices"][0]
    assert choice["finish_reason"] == "length"
    assert "tool_calls" not in choice["message"]
    assert choice["message"]["content"].startswith("<tool")


def test_without_tools_the_answer_has_no_calls_field(vl_client: TestClient) -> None:
    bare = {key: value for key, value in ASK.items() if key != "tools"}
    message = vl_client.post("/v1/chat/completions", json=bare).json()["choices"][0]["message"]
    assert set(message) == {"role", "content"}


CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
BAD_FUNCTION = {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
UNUSABLE = {
    "type": "function",
    "function": {"name": "g", "parameters": {"type": "object", "not": {"required": ["x"]}}},
}


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"tool_choice": "required", "tools": None}, "tool_choice", "needs tools"),
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not among tools",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice", "'none', 'auto' or 'required'"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "'get_weather' is twice"),
        ({"tools": [BAD_FUNCTION]}, "tools[0].function.parameters", "an object"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools[0].function.name",
            "pattern",
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "'function'"),
        (
            {"tools": [TOOLS[0], UNUSABLE], "tool_choice": "required"},
            "tools[1].function.parameters",
            "can't be used for constrained decoding",
        ),
        (  # a named function is found by its place among tools
            {
                "tools": [TOOLS[0], UNUSABLE],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tools[1].function.parameters",
            "the schema of 'g'",
        ),
        (
            {"tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "must call a tool",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
            "JSON text of an object",
        ),
        (  # nested past what the JSON parser follows: a 400, not a RecursionError's 500
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
            "JSON text of an object",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]},
            "messages[0].tool_calls",
            "only an assistant message",
        ),
        ({"messages": [{"role": "tool", "tool_call_id": "c"}]}, "messages[0].content", "result"),
        (
            {
                "messages": [
                    {
                        "role": "tool",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_uri(png_bytes((8, 8)))}}
                        ],
                    }
                ]
            },
            "messages[0].content",
            "send images in a user message",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "description": "<|im_end|>"}}
                ]
            },
            "tools",
            "control token",
        ),
        ({"functions": [{"name": "f"}]}, "functions", "send tools"),
    ],
)
def test_bad_tool_fields_are_400s_naming_the_field(
    vl_client: TestClient, fields: dict[str, Any], param: str, says: str
) -> None:
    response = vl_client.post("/v1/chat/completions", json={**ASK, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert says in error["message"]


def test_qwens_own_tag_tokens_are_text_that_the_grammar_allows(tiny_cache: Path) -> None:
    """Qwen2.5's vocabulary has `<tool_call>` and `</tool_call>` as added tokens that are not
    special (its tokenizer_config), so a real model writes each as one token, decoding keeps
    them, and a required call's grammar takes them. The tiny tokenizer spells them out; here it
    gains them as Qwen's has them."""
    import llguidance.hf
    from llguidance import LLMatcher
    from transformers import AutoTokenizer

    from hunyuan_service.api.tool_calls import Function, call_grammar
    from hunyuan_service.models.qwen_vl import _has_tag_tokens
    from hunyuan_service.models.tiny import ensure_tiny_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_checkpoint("image2text", tiny_cache))
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"])  # added, not special
    text = '<tool_call>\n{"name":"get_time","arguments":{"offset":3}}\n</tool_call>'
    ids = tokenizer.encode(text)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert (pieces[0], pieces[-1]) == ("<tool_call>", "</tool_call>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    lark = call_grammar([Function("get_time", None, CLOCK)], parallel=False, tag_tokens=True)
    grammar = LLMatcher.grammar_from_lark(lark)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    matcher = LLMatcher(
        llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=eos), grammar
    )
    assert matcher.try_consume_tokens(ids) == len(ids)
    assert matcher.is_accepting()
    assert _has_tag_tokens(tokenizer)
    spelled = AutoTokenizer.from_pretrained(ensure_tiny_checkpoint("image2text", tiny_cache))
    assert not _has_tag_tokens(spelled)
    special = AutoTokenizer.from_pretrained(ensure_tiny_checkpoint("image2text", tiny_cache))
    special.add_tokens(["<tool_call>", "</tool_call>"], special_tokens=True)  # decoding drops them
    assert not _has_tag_tokens(special)


def test_the_demo_reports_whether_its_vocabulary_has_the_tags(vl_client: TestClient) -> None:
    # The tiny tokenizer spells them out, so its grammar takes their text alone.
    assert vl_client.get("/health").json()["tool_call_tokens"] is False

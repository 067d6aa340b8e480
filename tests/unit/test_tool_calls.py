"""Qwen's tool-call format: the turns the model reads, the grammar of a required call, and
reading calls back out of an answer, whole or streamed."""

from __future__ import annotations

import json

import pytest
from llguidance import LLMatcher, LLTokenizer

from hunyuan_service.api.tool_calls import (
    DEFAULT_SYSTEM,
    MAX_PARALLEL_CALLS,
    CallHoldback,
    Function,
    call_grammar,
    parse_calls,
    with_tools,
)
from hunyuan_service.models.types import ChatMessage

ADD = Function(
    "add",
    "Adds two integers",
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"$ref": "#/$defs/Small"}},
        "required": ["a", "b"],
        "additionalProperties": False,
        "$defs": {"Small": {"type": "integer", "minimum": 0, "maximum": 9}},
    },
)
NOW = Function("now", None, None)


def call(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_calls_are_read_with_the_text_before_them() -> None:
    text = "Let me add them.\n" + call("add", {"a": 1, "b": 2}) + "\n" + call("now", {})
    content, calls = parse_calls(text, ["add", "now"])
    assert content == "Let me add them."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("add", {"a": 1, "b": 2}),
        ("now", {}),
    ]
    assert len({c.id for c in calls}) == 2
    assert all(c.id.startswith("call_") for c in calls)


def test_an_answer_of_calls_alone_has_no_content() -> None:
    content, calls = parse_calls("\n" + call("now", {}), ["now"])
    assert (content, [c.name for c in calls]) == (None, ["now"])


def test_arguments_written_as_json_text_are_read_as_the_object() -> None:
    text = '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>'
    assert json.loads(parse_calls(text, ["add"])[1][0].arguments) == {"a": 1}


@pytest.mark.parametrize(
    "text",
    [
        "no calls here",
        call("delete_everything", {}),  # a function not offered
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',
        call("add", {"a": 1}) + '<tool_call>{"name": "add"',  # the last call is cut short
        call("add", {"a": 1}) + "<tool_call>[]</tool_call>",  # one bad call spoils the rest
        '<tool_call>{"name": ["add"], "arguments": {}}</tool_call>',  # a name not a string
        # Nested past what the JSON parser follows: a RecursionError, which is not a crash.
        '<tool_call>{"name": "add", "arguments": ' + "[" * 5000 + "]" * 5000 + "}</tool_call>",
        '<tool_call>{"name": "add", "arguments": "' + "[" * 5000 + "]" * 5000 + '"}</tool_call>',
    ],
)
def test_an_answer_whose_calls_do_not_all_parse_is_all_text(text: str) -> None:
    assert parse_calls(text, ["add"]) == (text, [])


def stream(pieces: list[str], calls: bool) -> str:
    held = CallHoldback()
    out = "".join(held.feed(piece) for piece in pieces)
    return out + held.finish([object()] if calls else [])  # type: ignore[list-item]


def test_streamed_text_stops_where_a_call_opens() -> None:
    pieces = ["Let me ", "add.", "\n<tool", "_call>", '\n{"name": "add"}', "\n</tool_call>"]
    assert stream(pieces, calls=True) == "Let me add."
    # Were it not read as calls, the held text follows, so nothing is lost.
    assert stream(pieces, calls=False) == "".join(pieces)


@pytest.mark.parametrize(
    "pieces", [["a <to", "ast> b"], ["x  ", " y"], ["<", "tool", "_box>"], ["end<tool_c"]]
)
def test_text_that_only_looks_like_an_opening_is_streamed_whole(pieces: list[str]) -> None:
    held = CallHoldback()
    streamed = "".join(held.feed(piece) for piece in pieces)
    assert streamed + held.finish([]) == "".join(pieces)
    assert not held.in_call


def test_tool_results_in_a_row_share_one_user_turn_and_the_tools_end_the_system_message() -> None:
    messages = [
        ChatMessage("user", "sum?"),
        ChatMessage("assistant", call("add", {"a": 1, "b": 2})),
        ChatMessage("tool", "<tool_response>\n3\n</tool_response>"),
        ChatMessage("tool", "<tool_response>\n4\n</tool_response>"),
        ChatMessage("user", "thanks"),
        ChatMessage("tool", "<tool_response>\n5\n</tool_response>"),
    ]
    roles = [m.role for m in messages]
    turns = with_tools(messages, roles, "\n\n# Tools")
    assert [(t.role, t.text) for t in turns] == [
        ("system", DEFAULT_SYSTEM + "\n\n# Tools"),
        ("user", "sum?"),
        ("assistant", messages[1].text),
        ("user", "<tool_response>\n3\n</tool_response>\n<tool_response>\n4\n</tool_response>"),
        ("user", "thanks"),
        ("user", "<tool_response>\n5\n</tool_response>"),
    ]
    system = [ChatMessage("system", "Be brief."), ChatMessage("user", "hi")]
    turns = with_tools(system, ["system", "user"], "\n\n# Tools")
    assert [t.text for t in turns] == ["Be brief.\n\n# Tools", "hi"]
    assert with_tools(system, ["system", "user"], None) == tuple(system)


def matcher(lark: str) -> tuple[LLMatcher, LLTokenizer]:
    tokenizer = LLTokenizer("byte")
    grammar = LLMatcher.grammar_from_lark(lark)
    assert not LLMatcher.validate_grammar_with_warnings(grammar, None)[0]
    return LLMatcher(tokenizer, grammar), tokenizer


def accepts(lark: str, text: str) -> bool:
    """Whether `text` is a whole answer the grammar allows."""
    found, tokenizer = matcher(lark)
    tokens = tokenizer.tokenize_str(text)
    return found.try_consume_tokens(tokens) == len(tokens) and found.is_accepting()


def compact(name: str, arguments: dict) -> str:
    body = json.dumps({"name": name, "arguments": arguments}, separators=(",", ":"))
    return f"<tool_call>\n{body}\n</tool_call>"


def test_a_required_call_follows_its_functions_schema_compactly() -> None:
    lark = call_grammar([ADD, NOW], parallel=False)
    assert accepts(lark, compact("add", {"a": -4, "b": 9}))
    assert accepts(lark, compact("now", {}))
    assert not accepts(lark, compact("add", {"a": 1, "b": 10}))  # b's $ref: at most 9
    assert not accepts(lark, compact("add", {"a": 1}))  # b is required
    assert not accepts(lark, compact("sub", {"a": 1, "b": 2}))
    assert not accepts(lark, call("add", {"a": 1, "b": 2}))  # blanks: a model could loop on them
    assert not accepts(lark, "Sure! " + compact("now", {}))
    assert not accepts(lark, compact("now", {}) + "\n" + compact("now", {}))  # not parallel


def test_parallel_calls_are_bounded() -> None:
    lark = call_grammar([NOW], parallel=True)
    calls = [compact("now", {})] * MAX_PARALLEL_CALLS
    assert accepts(lark, "\n".join(calls))
    assert not accepts(lark, "\n".join([*calls, compact("now", {})]))


def test_beside_a_response_format_the_answer_is_calls_or_that_json() -> None:
    answer = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    lark = call_grammar([NOW], parallel=False, answer=answer)
    assert accepts(lark, compact("now", {}))
    assert accepts(lark, '{"x":3}')
    assert not accepts(lark, '{"y":3}')
    assert not accepts(lark, "plain text")

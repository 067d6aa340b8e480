"""Tool calling for image2text, in the format Qwen2.5 models were trained on (Hermes-style).

- The tools are described at the end of the system message: each function's JSON on its own
  line in a `<tools>` block, then how to call one.
- A call is the assistant's text `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  several calls one after another; an earlier call sent back is rendered the same way.
- A tool's result is a user turn of `<tool_response>\\n...\\n</tool_response>` blocks: results
  sent one after another share one turn.
- An answer's calls are parsed back out of its text (`parse_calls`); with `tool_choice`
  "required" or a named function, decoding is held to calls (`call_grammar`), whose arguments
  follow the function's `parameters` schema.

Qwen2.5-VL's own chat template has no tools, so this module writes them into the messages'
text; the template then renders the turns as it renders any other.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hunyuan_service.models.types import ChatMessage

DEFAULT_SYSTEM = "You are a helpful assistant."  # the template's own, where a chat has none
MAX_PARALLEL_CALLS = 8  # calls in one constrained answer; a model that loops stops here
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
# Compact JSON in constrained calls: with flexible whitespace a model could emit blanks until
# its token budget ends (as for response_format, models/grammar.py).
_COMPACT = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Function:
    """A function a request offers: its name, description and JSON schema of its arguments."""

    name: str
    description: str | None
    parameters: dict[str, Any] | None

    def as_json(self) -> str:
        spec: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            spec["description"] = self.description
        if self.parameters is not None:
            spec["parameters"] = self.parameters
        return json.dumps({"type": "function", "function": spec}, ensure_ascii=False)


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: a new id, the function's name, its arguments as JSON text."""

    id: str
    name: str
    arguments: str

    def as_chat(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's chat `tool_calls` entry (with `index` in a stream's delta)."""
        call = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def tools_prompt(functions: Sequence[Function]) -> str:
    """What the system message gains when a request offers tools."""
    lines = "\n".join(function.as_json() for function in functions)
    return (
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{lines}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f"{OPEN}{CLOSE} XML tags:\n"
        f'{OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE}'
    )


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """An earlier call, as the assistant wrote it."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


def response_text(content: str) -> str:
    """A tool's result, as the user turn carries it."""
    return f"<tool_response>\n{content}\n</tool_response>"


def with_tools(
    messages: Iterable[ChatMessage], roles: Iterable[str], prompt: str | None
) -> tuple[ChatMessage, ...]:
    """The turns the model reads: a run of tool results (`roles` "tool", their text already
    `response_text`) becomes one user turn, and `prompt` (`tools_prompt`) ends the system
    message, which is the template's default where the chat has none."""
    turns: list[ChatMessage] = []
    follows_result = False
    for message, role in zip(messages, roles, strict=True):
        if role == "tool" and follows_result:
            last = turns[-1]
            turns[-1] = ChatMessage("user", f"{last.text}\n{message.text}")
        elif role == "tool":
            turns.append(ChatMessage("user", message.text))
        else:
            turns.append(message)
        follows_result = role == "tool"
    if prompt is not None:
        if turns and turns[0].role == "system":
            first = turns[0]
            turns[0] = ChatMessage(
                "system", first.text + prompt, first.images, first.videos, first.image_pixels
            )
        else:
            turns.insert(0, ChatMessage("system", DEFAULT_SYSTEM + prompt))
    return tuple(turns)


def call_grammar(
    functions: Sequence[Function],
    parallel: bool,
    answer: dict[str, Any] | None = None,
    tag_tokens: bool = False,
) -> str:
    """llguidance's Lark grammar for an answer of calls to `functions` (up to
    MAX_PARALLEL_CALLS when `parallel`, else one), each call's arguments held to its function's
    schema; with `answer`, a JSON value of that schema may be given instead of calls (a
    response_format beside `tool_choice` "auto").

    With `tag_tokens` (the model's vocabulary has `<tool_call>` and `</tool_call>` as tokens,
    as Qwen2.5's has), each tag may also be that one token: llguidance matches a vocabulary's
    added tokens only where the grammar names them as tokens, never through their text."""
    if answer is None:
        rules = ["start: calls"]
    else:
        rules = ["start: calls | answer", f"answer: %json {_compact(answer)}"]
    more = f'("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    rules.append(f"calls: call {more}")
    names = " | ".join(f"f{i}" for i in range(len(functions)))
    opening, closing = _literal(OPEN), _literal(CLOSE)
    if tag_tokens:
        opening, closing = f"({OPEN} | {opening})", f"({CLOSE} | {closing})"
    head, tail = _literal('\n{"name":'), _literal("}\n")
    rules.append(f"call: {opening} {head} ({names}) {tail} {closing}")
    for i, function in enumerate(functions):
        head = _literal(json.dumps(function.name) + ',"arguments":')
        rules.append(f"f{i}: {head} a{i}")
        rules.append(f"a{i}: %json {_compact(function.parameters or {'type': 'object'})}")
    return "\n".join(rules)


def _compact(schema: dict[str, Any]) -> str:
    return json.dumps({**schema, "x-guidance": _COMPACT}, ensure_ascii=False)


def _literal(text: str) -> str:
    """A Lark string literal (JSON's escapes are Lark's)."""
    return json.dumps(text)


def json_object(text: str) -> dict[str, Any] | None:
    """The object `text` is the JSON of, or None: other JSON, not JSON, or nested past what the
    parser can follow (a RecursionError, which a client or a model can cause)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def parse_calls(text: str, names: Iterable[str]) -> tuple[str | None, list[ToolCall]]:
    """An answer's text before its first call (None when blank) and its calls, each with a new
    id. An answer whose calls do not all parse, or name a function not offered, or one left
    open, is all text: no calls, the whole text the content."""
    blocks = _CALL.findall(text)
    if text.count(OPEN) != len(blocks):  # a call that never closed: cut short, or not a call
        return text, []
    known = set(names)
    calls: list[ToolCall] = []
    for block in blocks:
        body = json_object(block)
        name = body.get("name") if body is not None else None
        if body is None or not isinstance(name, str) or name not in known:
            return text, []
        arguments = body.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as JSON text
            arguments = json_object(arguments)
        if not isinstance(arguments, dict):
            return text, []
        arguments_text = json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(f"call_{secrets.token_hex(12)}", name, arguments_text))
    if not calls:
        return text, []
    content = text[: text.index(OPEN)].rstrip()
    return content or None, calls


class CallHoldback:
    """Streams an answer's text until a call may begin: from there on the text is held, since
    it is parsed as calls once the answer is whole (`finish`). Trailing blanks are held too, as
    the content before a call is sent without them."""

    def __init__(self) -> None:
        self.pending = ""
        self.in_call = False

    def feed(self, text: str) -> str:
        self.pending += text
        if self.in_call:
            return ""
        if OPEN in self.pending:
            self.in_call = True
            return ""
        text = self.pending
        begun = range(min(len(OPEN) - 1, len(text)), 0, -1)  # a call's opening, begun at the end
        size = next((n for n in begun if OPEN.startswith(text[-n:])), 0)
        cut = len(text[: len(text) - size].rstrip())  # and the blanks before it
        out, self.pending = text[:cut], text[cut:]
        return out

    def finish(self, calls: list[ToolCall]) -> str:
        """The held text, once the answer is whole: none if it made calls."""
        out, self.pending = ("" if calls else self.pending), ""
        return out

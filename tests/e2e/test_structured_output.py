"""Structured output from the tiny random-weight Qwen: its text is junk, yet every constrained
answer parses and validates against its schema, through the official OpenAI SDK and /infer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.images import png_bytes
from tests.service_process import ServiceProcess, tiny_env

pytestmark = pytest.mark.slow

# Random weights never end a free string or number by choice, so strings, arrays and numbers
# (their digits too, by `multipleOf`) are bounded here: the grammar then has to close them, and
# every answer ends within its token budget.
RECEIPT = {
    "type": "object",
    "properties": {
        "merchant": {"type": "string", "maxLength": 12},
        "total": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.01},
        "currency": {"type": "string", "enum": ["EUR", "USD", "JPY"]},
        "items": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 8},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                },
                "required": ["name", "qty"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["merchant", "total", "currency", "items"],
    "additionalProperties": False,
}
FORM = {
    "type": "object",
    "properties": {
        "applicant": {
            "type": "object",
            "properties": {
                "age": {"type": "integer", "minimum": 18, "maximum": 120},
                "employed": {"type": "boolean"},
                "score": {"type": "number", "minimum": -1.5, "maximum": 1.5, "multipleOf": 0.25},
            },
            "required": ["age", "employed", "score"],
            "additionalProperties": False,
        },
        "status": {"enum": ["approved", "rejected", None]},
    },
    "required": ["applicant", "status"],
    "additionalProperties": False,
}
TAGS = {
    "type": "array",
    "minItems": 1,
    "maxItems": 4,
    "items": {"type": "string", "enum": ["cat", "dog", "bird"]},
}
SCHEMAS = {"receipt": RECEIPT, "form": FORM, "tags": TAGS}
# Greedy, and sampled with seeds; a tiny top-p after a high temperature keeps one token only,
# which must be an allowed one (the mask runs before the sampling warpers).
SAMPLING = [{}, {"temperature": 1.0, "seed": 7}, {"temperature": 2.0, "top_p": 0.05, "seed": 3}]


@pytest.fixture(scope="module")
def service(tiny_cache: Path) -> Iterator[ServiceProcess]:
    env = tiny_env(tiny_cache, MODEL_TYPE="image2text", MAX_BATCH_SIZE="4", BATCH_WAIT_MS="50")
    with ServiceProcess(env) as process:
        yield process


@pytest.fixture(scope="module")
def client(service: ServiceProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)


def schema_format(name: str) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True},
    }


def ask(text: str = "Read this receipt.") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "sampled", "hot-top-p"])
def test_every_answer_validates_against_its_schema(
    client: openai.OpenAI, name: str, sampling: dict[str, Any]
) -> None:
    completion = client.chat.completions.create(
        model="tiny",
        messages=ask(),
        max_tokens=400,
        response_format=schema_format(name),
        **sampling,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content or ""), SCHEMAS[name])


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_streamed_answers_validate_and_equal_the_whole_answer(
    client: openai.OpenAI, name: str
) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=ask("Fill in the form."),
            max_tokens=400,
            response_format=schema_format(name),
            stream=True,
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    jsonschema.validate(json.loads(streamed), SCHEMAS[name])
    whole = client.chat.completions.create(
        model="tiny",
        messages=ask("Fill in the form."),
        max_tokens=400,
        response_format=schema_format(name),
    )
    assert streamed == whole.choices[0].message.content  # greedy: the same either way


class Item(BaseModel):
    name: str = Field(max_length=8)
    qty: int = Field(ge=1, le=99)


class Receipt(BaseModel):
    merchant: str = Field(max_length=12)
    currency: Literal["EUR", "USD", "JPY"]
    items: list[Item] = Field(max_length=3)


def test_the_sdk_parse_helper_returns_the_pydantic_model(client: openai.OpenAI) -> None:
    for seed in (1, 2):
        completion = client.chat.completions.parse(
            model="tiny",
            messages=ask(),
            max_tokens=400,
            temperature=1.0,
            seed=seed,
            response_format=Receipt,
        )
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, Receipt)
        assert all(isinstance(item, Item) for item in parsed.items)


def test_json_object_gives_a_json_object(client: openai.OpenAI) -> None:
    for seed in (1, 2, 3):
        completion = client.chat.completions.create(
            model="tiny",
            messages=ask("Answer in JSON."),
            max_tokens=400,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_object"},
        )
        choice = completion.choices[0]
        if choice.finish_reason == "stop":  # an unbounded object may run out of tokens
            assert isinstance(json.loads(choice.message.content or ""), dict)
        else:
            assert choice.finish_reason == "length"
            assert (choice.message.content or "").startswith("{")


def test_a_cut_answer_says_length(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="tiny",
        messages=ask(),
        max_tokens=12,
        response_format=schema_format("receipt"),
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 12
    # The tiny tokenizer spells one character per token: the first property, forced.
    assert choice.message.content == '{"merchant":'


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "string", "format": "colour"}, "colour"),
        ({"type": "strng"}, "strng"),
        ({"$ref": "https://example.com/schema.json"}, "example.com"),
    ],
)
def test_an_unusable_schema_is_a_400_that_names_the_problem(
    client: openai.OpenAI, service: ServiceProcess, schema: dict[str, Any], named: str
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(openai.BadRequestError, match=named) as caught:
        client.chat.completions.create(
            model="tiny",
            messages=ask(),
            response_format=response_format,
        )
    assert caught.value.code == "unsupported_schema"
    reply = httpx.post(
        f"{service.url}/infer", json={"prompt": "x", "response_format": response_format}
    )
    assert reply.status_code == 400
    assert named in reply.json()["error"]["message"]


def test_infer_takes_response_format_in_json_and_multipart(service: ServiceProcess) -> None:
    response_format = schema_format("form")
    body: dict[str, Any] = {"prompt": "Fill in the form.", "response_format": response_format}
    body["max_new_tokens"] = 400
    reply = httpx.post(f"{service.url}/infer", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["finish_reason"] == "stop"
    jsonschema.validate(json.loads(reply.json()["text"]), FORM)
    reply = httpx.post(
        f"{service.url}/infer",
        timeout=120,
        data={"prompt": "What is here?", "response_format": json.dumps(schema_format("tags"))},
        files=[("images", ("a.png", png_bytes((64, 48)), "image/png"))],
    )
    assert reply.status_code == 200, reply.text
    jsonschema.validate(json.loads(reply.json()["text"]), TAGS)
    reply = httpx.post(
        f"{service.url}/infer",
        data={"prompt": "x", "response_format": "{not json"},
        files=[("images", ("a.png", png_bytes((32, 32)), "image/png"))],
    )
    assert reply.status_code == 422
    assert "response_format" in reply.json()["error"]["message"]


def test_a_stop_sequence_cuts_a_constrained_answer(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="tiny",
        messages=ask(),
        max_tokens=400,
        stop=['":'],
        response_format=schema_format("receipt"),
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == '{"merchant'  # cut before the first key's colon


def test_a_constrained_job_stops_within_a_token_when_cancelled(qwen: Any) -> None:
    from hunyuan_service.errors import JobCancelled
    from hunyuan_service.models.base import JobContext
    from hunyuan_service.models.grammar import compile_response_format
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    grammar = compile_response_format("json_schema", {"type": "array", "items": {}}, "open")
    request = Image2TextInput((ChatMessage("user", "x"),), max_new_tokens=200, grammar=grammar)
    pieces: list[str] = []
    context = JobContext(on_token=pieces.append, should_stop=lambda: len(pieces) >= 3)
    with pytest.raises(JobCancelled):
        qwen.infer(request, context)
    assert len(pieces) <= 4
    assert "".join(pieces).startswith("[")

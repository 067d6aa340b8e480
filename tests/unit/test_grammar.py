"""Compiling `response_format` into a grammar: cached per schema, refusals that name the problem,
and the order of the mask and the sampling warpers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hunyuan_service.errors import BadRequest
from hunyuan_service.models import grammar
from hunyuan_service.models.grammar import MAX_SCHEMA_CHARS, compile_response_format


def test_each_schema_is_compiled_once() -> None:
    schema = {"type": "object", "properties": {"unique_to_this_test": {"type": "integer"}}}
    before = grammar._compile.cache_info()
    first = compile_response_format("json_schema", schema, "a")
    second = compile_response_format("json_schema", dict(schema), "b")
    after = grammar._compile.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    assert first.grammar == second.grammar
    assert (first.name, second.name) == ("a", "b")


def test_property_order_is_kept() -> None:
    """The answer lists properties in the schema's order, so the cache key is not sorted."""
    ab = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}}}
    ba = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
    assert (
        compile_response_format("json_schema", ab, "x").grammar
        != compile_response_format("json_schema", ba, "x").grammar
    )


def test_json_object_is_any_object() -> None:
    assert compile_response_format("json_object", None, "").kind == "json_object"


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"if": {"type": "string"}, "then": {"maxLength": 3}}, '"if", "then"'),
        ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
        ({"type": "object", "properties": {"x": {"type": "nope"}}}, "nope"),
    ],
)
def test_unusable_schemas_are_400s_that_name_the_problem(schema: dict, named: str) -> None:
    with pytest.raises(BadRequest, match="can't be used for constrained decoding") as caught:
        compile_response_format("json_schema", schema, "x")
    assert named in caught.value.message
    assert (caught.value.status_code, caught.value.code) == (400, "unsupported_schema")
    assert caught.value.param == "response_format"


def test_a_huge_schema_is_refused_before_compiling() -> None:
    schema = {"type": "string", "description": "x" * MAX_SCHEMA_CHARS}
    with pytest.raises(BadRequest, match=f"at most {MAX_SCHEMA_CHARS}"):
        compile_response_format("json_schema", schema, "x")


def test_the_mask_runs_before_the_sampling_warpers() -> None:
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    mask = object()
    checkpoint = SimpleNamespace(temperature=0.1, top_k=5, top_p=0.5)
    kwargs = grammar.sampling_after(
        mask,
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9},
        checkpoint,
    )
    processors = list(kwargs["logits_processor"])
    assert processors[0] is mask
    assert [type(p) for p in processors[1:]] == [
        TemperatureLogitsWarper,
        TopKLogitsWarper,  # not in the request: the checkpoint's top_k, as without a grammar
        TopPLogitsWarper,
    ]
    assert processors[2].top_k == 5
    assert processors[3].top_p == 0.9
    # transformers' own warpers are off, or they would run before the mask.
    assert (kwargs["temperature"], kwargs["top_k"], kwargs["top_p"]) == (None, None, None)


def test_greedy_keeps_its_settings_and_gets_the_mask_only() -> None:
    mask = object()
    greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    kwargs = grammar.sampling_after(mask, greedy, SimpleNamespace())
    assert list(kwargs["logits_processor"]) == [mask]
    assert {k: kwargs[k] for k in greedy} == greedy


def test_a_constrained_sampled_request_gets_the_same_warper_defaults_as_generate() -> None:
    from transformers import GenerationConfig, TemperatureLogitsWarper, TopKLogitsWarper

    from hunyuan_service.models.grammar import sampling_after

    mask = object()
    # A checkpoint that sets no sampling defaults: generate would still apply top-k 50.
    kwargs = sampling_after(mask, {"do_sample": True, "temperature": 0.7}, GenerationConfig())
    processors = list(kwargs["logits_processor"])
    assert processors[0] is mask  # the grammar first, then the warpers
    assert [type(p) for p in processors[1:]] == [TemperatureLogitsWarper, TopKLogitsWarper]
    assert processors[2].top_k == 50
    assert kwargs["top_k"] is None  # generate's own warpers are off: these replace them

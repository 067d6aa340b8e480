"""Structured output for image2text: JSON (optionally a JSON Schema) enforced while decoding.

The grammar library is llguidance (see docs/structured-output.md for why). A request's
`response_format` is compiled once per distinct schema into an `OutputGrammar` (cached, and run
off the event loop by the caller); while generating, `GrammarMask` masks every token that would
leave the grammar, so whatever the weights say, the text is JSON that fits the schema unless
generation is cut short by `max_tokens`, a stop sequence or a cancel.

Compiling needs no tokenizer and no torch, so the HTTP layer can refuse an unsupported schema
with a 400 before the request takes a queue place.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from hunyuan_service.errors import BadRequest
from hunyuan_service.models.types import OutputGrammar

MAX_SCHEMA_CHARS = 65_536  # a schema's JSON text; real extraction schemas are a few KB
# Compact JSON: with flexible whitespace, a model could emit blanks until max_tokens.
_JSON_OPTIONS: Any = {"whitespace_flexible": False}


def compile_response_format(kind: str, schema: dict[str, Any] | None, name: str) -> OutputGrammar:
    """The grammar for `json_object` (any JSON object) or `json_schema` (that schema).

    Raises `BadRequest` naming the problem when the schema is invalid or uses a feature the
    grammar library does not implement (e.g. `not`, `if`/`then`, `uniqueItems`).
    """
    # Not sorted: the order of `properties` is the order the answer gives them in.
    text = json.dumps({"type": "object"} if schema is None else schema)
    grammar = _usable(text, "response_format", "the JSON schema")
    return OutputGrammar(grammar=grammar, kind=kind, name=name)


def compile_tool_calls(
    functions: list[tuple[int, str, dict[str, Any] | None]], lark: str
) -> OutputGrammar:
    """The grammar of an answer made of tool calls (`lark`, api/tool_calls.py builds it).
    Each function's `parameters` schema (with its index in `tools` and its name) is checked
    first, so that a 400 names the one the grammar library can't use."""
    for index, name, parameters in functions:
        text = json.dumps(parameters or {"type": "object"})
        _usable(text, f"tools[{index}].function.parameters", f"the schema of {name!r}")
    grammar = _usable(lark, "tools", "the tools", lark=True)
    return OutputGrammar(grammar=grammar, kind="tool_calls")


def _usable(text: str, param: str, what: str, lark: bool = False) -> str:
    """`_compile`, with a 400 naming `param` for a schema too large or one the library can't
    use (a Lark grammar is built here from schemas already checked: its size is theirs)."""
    if not lark and len(text) > MAX_SCHEMA_CHARS:
        raise BadRequest(
            f"{param}: {what} is {len(text)} characters of JSON; at most {MAX_SCHEMA_CHARS} are "
            "accepted",
            param=param,
            code="invalid_schema",
        )
    try:
        return _compile(text, lark)
    except _Unusable as error:
        raise BadRequest(
            f"{param}: {what} can't be used for constrained decoding: {error}",
            param=param,
            code="unsupported_schema",
        ) from None


class _Unusable(Exception):
    """A grammar the library refuses; the message says why."""


@functools.lru_cache(maxsize=256)
def _compile(text: str, lark: bool) -> str:
    """The llguidance grammar of a JSON schema's text (or of a Lark grammar), or `_Unusable`."""
    from llguidance import LLMatcher

    try:
        if lark:
            grammar = LLMatcher.grammar_from_lark(text)
        else:
            grammar = LLMatcher.grammar_from_json_schema(text, defaults=_JSON_OPTIONS)
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, None)
    except ValueError as error:
        failed, messages = True, [str(error)]
    if failed:
        problem = " ".join((messages or ["the schema can't be compiled"])[0].split())
        raise _Unusable(problem[:400])
    return grammar


class GrammarMask:
    """A `generate` logits processor: row i may only continue along its grammar (None: free).

    Each call first feeds the token chosen at the previous step to each row's matcher, then
    masks the logits of every token the grammar does not allow next; once the JSON is complete,
    only end-of-sequence is allowed. A row that has ended, or whose job stopped, is left
    unmasked: its tokens are padding or discarded. It must run before any sampling warper
    (temperature, top-k, top-p), so they choose among allowed tokens only; `sampling_after`
    builds that order.
    """

    def __init__(self, tokenizer: Any, grammars: list[OutputGrammar | None], vocab: int) -> None:
        import torch
        from llguidance import LLMatcher, LLParserLimits

        limits = LLParserLimits()  # the library's defaults bound lexer and parser work per token
        self.matchers = [
            None
            if grammar is None
            else LLMatcher(tokenizer, grammar.grammar, log_level=0, limits=limits)
            for grammar in grammars
        ]
        for matcher in self.matchers:
            if matcher is not None and matcher.is_error():
                raise BadRequest(
                    f"response_format: {matcher.get_error()[:400]}",
                    param="response_format",
                    code="unsupported_schema",
                )
        self.vocab = vocab
        self.words = (vocab + 31) // 32
        self.bitmask = torch.full((len(grammars), self.words), -1, dtype=torch.int32)
        self.bits: Any = None
        self.started = False

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        last = None
        if self.started:  # read only the rows still held to a grammar: each read may sync
            last = [
                -1 if matcher is None else int(input_ids[row, -1])
                for row, matcher in enumerate(self.matchers)
            ]
        self.advance(last)
        return self.apply(scores)

    def advance(self, last_tokens: list[int] | None) -> None:
        """Feeds each row the token it chose last (None before the first) and computes the
        next mask on the CPU; the continuous decoder calls this while the device still runs
        the step whose logits `apply` will mask."""
        if last_tokens is not None:
            for row, matcher in enumerate(self.matchers):
                if matcher is None:
                    continue
                # A finished grammar allowed only end-of-sequence, so the row has ended; and a
                # token the grammar refuses is padding after the row stopped another way.
                if matcher.is_stopped() or not matcher.consume_token(last_tokens[row]):
                    self.matchers[row] = None
        self.started = True
        self.bitmask.fill_(-1)
        for row, matcher in enumerate(self.matchers):
            if matcher is None:
                continue
            view = self.bitmask[row]
            matcher.unsafe_compute_mask_ptr(view.data_ptr(), self.words * 4)
            if matcher.is_error():  # a dead end (never seen): free the row rather than crash
                self.matchers[row] = None
                view.fill_(-1)

    @property
    def live(self) -> bool:
        """Whether any row is still held to its grammar (else `apply` changes nothing)."""
        return any(matcher is not None for matcher in self.matchers)

    def apply(self, scores: Any) -> Any:
        """Masks `scores` [rows, vocab] in place with the mask `advance` computed."""
        import torch

        if not self.live:
            return scores
        if self.bits is None or self.bits.device != scores.device:
            self.bits = torch.arange(32, dtype=torch.int32, device=scores.device)
        return mask_scores(scores, self.bitmask, self.vocab, self.bits)


def mask_scores(scores: Any, bitmask: Any, vocab: int, bits: Any) -> Any:
    """Masks `scores` [rows, vocab] in place: `bitmask` [rows, words] (int32, on the CPU) allows
    token 32 * w + b where bit b of word w is set; `bits` is `arange(32)` on the scores' device.
    Logits past the tokenizer's `vocab` are never text, so they are masked too."""
    words = bitmask.to(scores.device, non_blocking=True)
    allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().flatten(1)
    width = min(scores.shape[1], vocab)
    scores[:, :width].masked_fill_(~allowed[:, :width], float("-inf"))
    if scores.shape[1] > width:
        scores[:, width:] = float("-inf")
    return scores


def sampling_after(mask: GrammarMask, sampling: dict[str, Any], defaults: Any) -> dict[str, Any]:
    """`generate` kwargs that apply `mask` first, then the sampling warpers `sampling` asks for.

    transformers runs custom processors after its own warpers; a top-p warper that kept only
    disallowed tokens would then leave nothing to sample. So the warpers become custom ones,
    in transformers' own order, after the mask; a value `sampling` leaves out comes from
    `defaults` (the checkpoint's generation config), as it would without a grammar.
    """
    from transformers import LogitsProcessorList

    kwargs = dict(sampling)
    processors: list[Any] = [mask]
    if kwargs.get("do_sample"):
        temperature, top_k, top_p = (
            kwargs.pop(name, None) for name in ("temperature", "top_k", "top_p")
        )
        processors += sampling_warpers(temperature, top_k, top_p, defaults)
        # None turns off the checkpoint's own defaults, which would run before the mask.
        kwargs.update(temperature=None, top_k=None, top_p=None)
    kwargs["logits_processor"] = LogitsProcessorList(processors)
    return kwargs


def sampling_warpers(
    temperature: float | None, top_k: int | None, top_p: float | None, defaults: Any
) -> list[Any]:
    """Temperature, top-k and top-p warpers in transformers' own order, as `generate` builds them
    for a sampled request: a value left out (None) comes from `defaults`, the checkpoint's
    generation config, then from transformers' own defaults."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if temperature is None:
        temperature = generation_default(defaults, "temperature")
    if top_k is None:
        top_k = generation_default(defaults, "top_k")
    if top_p is None:
        top_p = generation_default(defaults, "top_p")
    warpers: list[Any] = []
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def generation_default(config: Any, name: str) -> Any:
    """What `generate` uses for a sampling setting a request leaves out: the checkpoint's
    generation config, else transformers' own default (top_k 50, for example)."""
    from transformers import GenerationConfig

    value = getattr(config, name, None)
    if value is not None:
        return value
    return GenerationConfig._get_default_generation_params().get(name)

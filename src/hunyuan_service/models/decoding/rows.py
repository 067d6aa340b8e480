"""One request in the continuous decoder: its KV range, its sampling, its stops and its stream.

Everything a row needs is its own: sampling settings and random generator (a seeded row draws
exactly what it would draw alone), stop strings, `max_new_tokens`, grammar, cancellation and
deadline (through its `JobContext`), token stream and usage counts.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from hunyuan_service.errors import JobCancelled
from hunyuan_service.models.base import JobContext
from hunyuan_service.models.grammar import generation_default, sampling_warpers
from hunyuan_service.models.types import Image2TextInput, Image2TextOutput


class RowSampler:
    """Chooses a row's next token the way `generate` would for this request alone: the
    repetition penalty, the grammar mask, then temperature, top-k and top-p, and greedy or a
    draw from the row's own generator (seeded like `torch.manual_seed(seed)` would seed it).
    The grammar's mask is computed apart (`prepare`), so that it can overlap the device's step."""

    def __init__(
        self, request: Image2TextInput, defaults: Any, grammar_mask: Any, device: Any
    ) -> None:
        import torch
        from transformers import RepetitionPenaltyLogitsProcessor

        self.processors: list[Any] = []  # before the grammar; the warpers come after it
        penalty = request.repetition_penalty
        if penalty is None:
            penalty = generation_default(defaults, "repetition_penalty")
        if penalty is not None and penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(penalty))
        self.grammar = grammar_mask
        self.warpers: list[Any] = []
        self.sampled = request.temperature > 0
        self.generator = None
        if self.sampled:
            self.warpers = sampling_warpers(
                request.temperature, request.top_k, request.top_p, defaults
            )
            seed = request.seed if request.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to apply: the batch takes all such rows' argmax in one read."""
        return not self.sampled and not self.processors and self.grammar is None

    @property
    def masked_greedy(self) -> bool:
        """Greedy with a grammar only: the batch masks all such rows at once, then reads them
        with the plain greedy rows."""
        return not self.sampled and not self.processors and self.grammar is not None

    def prepare(self, last_token: int | None) -> None:
        """Computes the grammar's mask for the next token on the CPU (None: before the first),
        while the device may still be computing the logits it will mask."""
        if self.grammar is not None:
            self.grammar.advance(None if last_token is None else [last_token])

    def pick(self, ids: Any, logits: Any) -> Any:
        """The next token from float32 `logits` [1, vocab], given the row's `ids` [1, n], as a
        tensor [1] on the logits' device, not read by the host; `prepare` has run for it."""
        import torch

        scores = logits
        for processor in self.processors:
            scores = processor(ids, scores)
        if self.grammar is not None:
            scores = self.grammar.apply(scores)
        for warper in self.warpers:
            scores = warper(ids, scores)
        if not self.sampled:
            return torch.argmax(scores, dim=-1)
        probabilities = torch.softmax(scores, dim=-1)
        # torch.multinomial's own draw of one sample (an exponential race: the same token from
        # the same generator state), without its checks of the probabilities, which read them
        # on the host and so would wait for the device.
        race = torch.empty_like(probabilities).exponential_(1, generator=self.generator)
        return torch.argmax(probabilities / race, dim=-1)


class TextStream:
    """Emits each new piece of a row's decoded text as a `token` event, through its context.

    Also a `generate` streamer (`put`, `end`), whose first `put` is the prompt. Text that ends in
    an incomplete UTF-8 sequence is held back until the next token completes it. Each token
    decodes a short window (the tokens since the last emission and the piece before them), not
    the whole answer, so the cost per token stays flat; a job nobody streams decodes nothing,
    unless `keep_text` asks for the text itself (a row's stop strings read it).
    """

    def __init__(
        self, tokenizer: Any, ctx: JobContext, prompt_seen: bool = False, keep_text: bool = False
    ) -> None:
        self.decode = text_decoder(tokenizer)
        self.ctx = ctx
        self.tokens: list[int] = []
        self.start = 0  # where the decoded window begins
        self.shown = 0  # tokens before this one are already emitted
        self.prompt_seen = prompt_seen
        self.keep_text = keep_text
        self.text = ""  # every piece emitted so far, when kept
        self.pending = ""  # decoded after `text` and held back: it ends in a cut character

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate first hands over the whole prompt
            self.prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        self._emit(final=False)

    def put_token(self, token: int) -> None:
        self.tokens.append(token)
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        streamed = self.ctx.wants_tokens
        if not (streamed or self.keep_text):
            return
        tokens = self.tokens
        # The window starts one emitted piece back, so a token's text is decoded with the token
        # before it (byte-level pieces and merges at the boundary come out as in the whole).
        before = self.decode(tokens[self.start : self.shown])
        text = self.decode(tokens[self.start :])
        piece = text[len(before) :]
        if not final and text.endswith("\ufffd"):
            self.pending = piece
            return
        self.pending = ""
        if piece:
            if streamed:
                self.ctx.on_token(piece)
            if self.keep_text:
                self.text += piece
            self.start, self.shown = self.shown, len(tokens)


def text_decoder(tokenizer: Any) -> Any:
    """`ids -> text` as `tokenizer.decode(ids, skip_special_tokens=True)` gives it, through the
    Rust tokenizer directly where that is the same (no clean-up of spaces), which skips the
    Python wrapper's per-call work."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


@dataclass(eq=False)
class Row:
    """A request decoding in the batch. Its last generated token was chosen but is not in the
    cache yet: the next step feeds it."""

    key: Any  # the feed's handle for the job
    request: Image2TextInput
    ctx: JobContext
    prompt_ids: list[int]
    start: int  # the row's range in the KV pool
    reserved: int
    rope_delta: int
    sampler: RowSampler
    streamer: TextStream
    eos: frozenset[int]
    cached: int = 0  # positions of the range written so far
    generated: list[int] = field(default_factory=list)
    checked: int = 0  # the stream's kept text up to here held no stop string
    ended: str | None = None  # "stop" or "length" once the row is done

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def take(self, token: int) -> None:
        """Appends a chosen token, streams its text, and decides whether the row has ended."""
        self.generated.append(token)
        if token in self.eos:
            self.ended = "stop"
            return
        self.streamer.put_token(token)
        if self.request.stop and self._holds_stop_string():
            self.ended = "stop"
            return
        if len(self.generated) >= self.request.max_new_tokens:
            self.ended = "length"

    def _holds_stop_string(self) -> bool:
        """Whether the text so far holds one of the request's stop strings, the text held back
        included, as decoding the whole answer would show it. The kept text up to `checked`
        held none at the last token, so a new one ends after it and starts at most the longest
        stop string's length (less one) before it: only that tail is searched, not the whole
        answer at every token."""
        stream, stops = self.streamer, self.request.stop
        reach = max(len(stop) for stop in stops) - 1
        recent = stream.text[max(0, self.checked - reach) :] + stream.pending
        self.checked = len(stream.text)
        return any(stop in recent for stop in stops)

    def output(self, decode: Any) -> Image2TextOutput:
        self.streamer.end()
        return answer(decode(self.generated), self.request, self.prompt_tokens, len(self.generated))

    def cancelled(self) -> JobCancelled:
        return JobCancelled(f"job stopped: {self.ctx.stop_reason()}", code=self.ctx.stop_reason())


def answer(
    text: str, request: Image2TextInput, prompt_tokens: int, completion_tokens: int
) -> Image2TextOutput:
    """A request's output: its text cut at the first stop string it holds, and `length` as the
    finish reason when it used all of `max_new_tokens` (OpenAI's meaning)."""
    for stop in request.stop:
        if stop in text:
            text = text[: text.index(stop)]
    return Image2TextOutput(
        text=text,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason="length" if completion_tokens >= request.max_new_tokens else "stop",
    )

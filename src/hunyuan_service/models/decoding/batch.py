"""The continuous decoder for Qwen2.5-VL: rows join between steps, step together, leave alone.

`DecodeBatch` is the small interface the model class drives from its thread:

- `prepare(request, ctx, key)` templates and tokenizes a request, readies its images (or
  finds them in the vision cache) and says how many KV positions it needs; `encode(prepared,
  budget)` runs its images through the vision encoder, a part at a time within the work one
  chunk of prompt costs (`turn_budget`), so that a large image or a video does not hold the
  running rows up for its whole encoding;
- `begin(prepared)` reserves its KV range and puts the images' features into the prompt's
  embeddings, with the 3-D rotary positions of its images as `generate` computes them;
  `advance(prefill)` runs the next chunk of its prompt through the text model, and after the
  last one copies its keys and values into the pool and chooses its first token: the request
  is a decoding row;
- `step()` decodes one token for every row in one forward pass over the pool and returns the
  rows that ended (by their end of text, a stop string, `max_new_tokens`, or their job
  stopping); with `ahead` (DECODE_AHEAD) it queues the pass before the host reads the tokens of
  the pass before it, so the host's work for one step overlaps the device's next step;
- `free(row)` gives a row's range back.

The decode step is this module's own forward over the text model's layers and weights (each
layer in layer.py): it reads each row's keys and values from its range (grouped-query
attention, KV heads never repeated), with every row at its own length and its own rotary
position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hunyuan_service.errors import InvalidInput
from hunyuan_service.models.base import JobContext
from hunyuan_service.models.decode_ahead import LateCopy
from hunyuan_service.models.decoding.graphs import step_inputs
from hunyuan_service.models.decoding.kv_pool import KVPool
from hunyuan_service.models.decoding.layer import (
    Rotations,
    attention_mask,
    decoder_layer,
    join_projections,
    rms_norm,
)
from hunyuan_service.models.decoding.rows import Row, RowSampler, TextStream
from hunyuan_service.models.types import Image2TextInput
from hunyuan_service.models.vision import Budget, VisionPlan


def _cat(features: Any) -> Any:
    import torch

    return torch.cat(list(features), dim=0) if isinstance(features, (list, tuple)) else features


def _pad_right(tensor: Any, width: int, dim: int) -> Any:
    """`tensor` extended to `width` along `dim` by repeating its last slice."""
    import torch

    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    last = tensor.narrow(dim, tensor.shape[dim] - 1, 1)
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, last.expand(shape)], dim=dim)


@dataclass
class Prepared:
    """A request templated and tokenized, waiting for KV room."""

    key: Any
    request: Image2TextInput
    ctx: JobContext
    plan: VisionPlan  # its tokens, and its images' encoding, run a part at a time
    prompt_tokens: int

    @property
    def needs(self) -> int:
        return self.prompt_tokens + self.request.max_new_tokens


@dataclass(eq=False)
class Prefill:
    """A request whose prompt runs a chunk at a time before it joins the decoding rows."""

    prepared: Prepared
    start: int  # its range in the KV pool
    embeds: Any  # the prompt's embeddings, images in place [1, tokens, hidden]
    positions: Any  # its rotary positions, as generate gives them
    rope_delta: int
    done: int = 0  # prompt tokens already run
    cache: Any = None  # the chunks' keys and values until the last one

    @property
    def key(self) -> Any:
        return self.prepared.key

    @property
    def ctx(self) -> JobContext:
        return self.prepared.ctx


@dataclass(eq=False)
class Pending:
    """The tokens a step chose [rows], on the device and on their way to the host: read at the
    end of the step, or with DECODE_AHEAD in the next one."""

    rows: list[Row | None]  # None: a row in the pass that was not decoding (ended, stopped)
    choices: Any
    copy: tuple[int, int]  # `LateCopy.send`'s


class DecodeBatch:
    """The rows decoding together on one model, and the KV pool they share.

    Args:
        model: a loaded `Qwen2_5_VLForConditionalGeneration`.
        tokenizer: its tokenizer.
        plan_request: turns one request into a `VisionPlan` (models/vision.py): its tokens on
            the device and its images ready to encode; or refuses it.
        grammar_mask: makes a row's `GrammarMask` for an `OutputGrammar` (None: no grammar).
        capacity: KV positions in all (KV_CACHE_TOKENS).
        chunk_tokens: prompt tokens a joining request runs between two steps (0: all at once).
        ahead: feed each row's chosen token to the next step on the device and read it one
            step later (DECODE_AHEAD).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        plan_request: Any,
        grammar_mask: Any,
        capacity: int,
        chunk_tokens: int = 0,
        ahead: bool = False,
    ) -> None:
        config = model.config.text_config
        if any(kind != "full_attention" for kind in getattr(config, "layer_types", [])):
            raise ValueError("the continuous decoder needs full attention in every layer")
        self.model = model
        self.text_model = model.model.language_model
        self.tokenizer = tokenizer
        self.plan_request = plan_request
        self.grammar_mask = grammar_mask
        self.device = model.device
        head_dim = config.hidden_size // config.num_attention_heads
        # The step's own projections; the model's modules then use views of these weights.
        self.joined = [join_projections(layer) for layer in self.text_model.layers]
        self.pool = KVPool(
            len(self.text_model.layers),
            config.num_key_value_heads,
            head_dim,
            capacity,
            self.device,
            model.dtype,
        )
        # Every rotary position a row can reach: its KV range's, moved by its rope delta
        # (below 0 with images; above it only for videos of small frames, within the model's
        # own limit).
        self.rotations = Rotations(
            self.text_model, max(capacity, config.max_position_embeddings) + 1
        )
        eos = model.generation_config.eos_token_id
        self.eos = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.rows: list[Row] = []
        self.chunk_tokens = chunk_tokens
        # A chunk's multiply-adds per prompt token in the text model's layers, for `turn_budget`.
        self.token_cost = sum(p.numel() for p in self.text_model.layers.parameters())
        self.padded: Any = None  # a PaddedStep once `pad_steps` ran; else exact shapes, eager
        self.bits: Any = None  # arange(32) on the device, for grammar bitmasks
        self.ahead = ahead
        self.pending: Pending | None = None  # with `ahead`, between steps: tokens not yet read
        self.late = LateCopy(self.device)  # each step reads the last one's copy, then sends

    # -- joining ---------------------------------------------------------------------------------

    def prepare(self, request: Image2TextInput, ctx: JobContext, key: Any) -> Prepared:
        plan = self.plan_request(request)
        return Prepared(key, request, ctx, plan, plan.tokens)

    def turn_budget(self) -> Budget | None:
        """The vision encoder's work allowed in one turn between two decode steps: about what
        one chunk of prompt costs the text model (None, no bound, with chunks off)."""
        return Budget(self.chunk_tokens * self.token_cost) if self.chunk_tokens else None

    def encode(self, prepared: Prepared, budget: Budget | None) -> bool:
        """Runs the request's images and videos through the vision encoder within `budget`;
        True once they are all encoded (or found in the vision cache)."""
        return prepared.plan.encode(budget)

    def fits(self, prepared: Prepared) -> bool:
        """Whether the pool could ever hold it (else the request must be refused)."""
        return prepared.needs <= self.pool.capacity

    def too_big(self, prepared: Prepared) -> InvalidInput:
        return InvalidInput(
            f"messages: the input is {prepared.prompt_tokens} tokens and max_new_tokens "
            f"{prepared.request.max_new_tokens}; together they need more KV cache than the "
            f"service has ({self.pool.capacity} positions, KV_CACHE_TOKENS): send less or ask "
            "for fewer tokens",
            param="messages",
        )

    def begin(self, prepared: Prepared) -> Prefill | None:
        """Reserves the request's KV range and embeds its prompt; `advance` then runs it a
        chunk at a time. None while its range is not free."""
        import torch

        start = self.pool.reserve(prepared.needs)
        if start is None:
            return None
        try:
            with torch.inference_mode():
                return self._begin(prepared, start)
        except BaseException:
            self.pool.release(start, prepared.needs)
            raise

    def advance(self, prefill: Prefill) -> Row | None:
        """Runs the next `chunk_tokens` of the prompt (all of it with 0); after the last chunk,
        the request becomes a decoding row with its first token, which this returns."""
        import torch

        try:
            with torch.inference_mode():
                logits = self._chunk(prefill)
        except BaseException:
            self.drop(prefill)
            raise
        if logits is None:
            return None
        return self._join_all([prefill], logits)[0]

    def fits_together(self, lengths: list[int]) -> bool:
        """Whether prompts of these lengths may run whole in one forward pass: padded to the
        longest, within one chunk's tokens (any number with chunks off)."""
        return not self.chunk_tokens or len(lengths) * max(lengths) <= self.chunk_tokens

    def advance_together(self, prefills: list[Prefill]) -> list[Row]:
        """Runs several whole prompts in one forward pass and makes each a decoding row.

        The prompts are padded on the right to the longest: with causal attention, no prompt
        token reads the padding after it, so each prompt's keys, values and last logits are
        its own (the padding's are dropped)."""
        import torch
        from transformers import DynamicCache

        try:
            with torch.inference_mode():
                lengths = [prefill.prepared.prompt_tokens for prefill in prefills]
                width = max(lengths)
                embeds = torch.cat([_pad_right(p.embeds, width, dim=1) for p in prefills])
                positions = torch.cat(
                    [_pad_right(p.positions, width, dim=-1) for p in prefills], dim=-2
                )
                cache: Any = DynamicCache(config=self.model.config.text_config)
                output = self.text_model(
                    inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True
                )
                for index, layer in enumerate(cache.layers):
                    for number, prefill in enumerate(prefills):
                        length = lengths[number]
                        self.pool.write(
                            index,
                            prefill.start,
                            layer.keys[number, :, :length],
                            layer.values[number, :, :length],
                        )
                ends = torch.tensor([length - 1 for length in lengths], device=embeds.device)
                hidden = output.last_hidden_state[torch.arange(len(prefills)), ends]
                logits = self.model.lm_head(hidden).float()
        except BaseException:
            for prefill in prefills:
                self.drop(prefill)
            raise
        return self._join_all(prefills, logits)

    def _join_all(self, prefills: list[Prefill], logits: Any) -> list[Row]:
        """Each prefilled request as a decoding row (`logits` [requests, vocab]); if one cannot
        join (its sampler or grammar failed), none does and every range is given back."""
        rows: list[Row] = []
        try:
            for number, prefill in enumerate(prefills):
                rows.append(self._join(prefill, logits[number : number + 1]))
        except BaseException:
            for row in rows:
                self.free(row)
            for prefill in prefills[len(rows) :]:
                self.drop(prefill)
            raise
        return rows

    def _join(self, prefill: Prefill, logits: Any) -> Row:
        """The prefilled request as a decoding row, with its first token chosen from `logits`."""
        prepared = prefill.prepared
        request, ctx = prepared.request, prepared.ctx
        grammar = None if request.grammar is None else self.grammar_mask(request.grammar)
        row = Row(
            key=prepared.key,
            request=request,
            ctx=ctx,
            prompt_ids=prepared.plan.partial["input_ids"][0].tolist(),
            start=prefill.start,
            reserved=prepared.needs,
            rope_delta=prefill.rope_delta,
            sampler=RowSampler(request, self.model.generation_config, grammar, self.device),
            streamer=TextStream(
                self.tokenizer, ctx, prompt_seen=True, keep_text=bool(request.stop)
            ),
            eos=self.eos,
            cached=prepared.prompt_tokens,
        )
        row.sampler.prepare(None)
        row.take(self._choose(row, logits))
        self.rows.append(row)
        return row

    def drop(self, prefill: Prefill) -> None:
        """Gives back the range of a request whose prefill will not finish (stopped, failed)."""
        self.pool.release(prefill.start, prefill.prepared.needs)

    def _begin(self, prepared: Prepared, start: int) -> Prefill:
        """The prompt's embeddings with the images' features in place (`encode` ran them, or
        runs what is left now), and the 3-D rotary positions `generate` would give it."""
        model = self.model
        inputs = prepared.plan.inputs()
        input_ids = inputs["input_ids"]
        positions = model._prepare_position_ids_for_generation(input_ids, inputs)
        delta = model.model.rope_deltas
        rope_delta = int(delta.reshape(-1)[0]) if delta is not None else 0
        # Its last step (one more with DECODE_AHEAD) at rotary position needs + rope_delta.
        if prepared.needs + rope_delta >= self.rotations.positions:
            raise InvalidInput(
                f"messages: the input's rotary positions with max_new_tokens "
                f"{prepared.request.max_new_tokens} reach {prepared.needs + rope_delta}, past "
                f"the {self.rotations.positions} this model serves: send less or ask for fewer "
                "tokens",
                param="messages",
            )
        vision = model.model
        embeds = vision.get_input_embeddings()(input_ids)
        encoded = inputs.get("mm_encoder_outputs", {})
        if encoded.get("image") is not None:
            images = _cat(encoded["image"].pooler_output).to(embeds.device, embeds.dtype)
            mask, _ = vision.get_placeholder_mask(
                input_ids, inputs_embeds=embeds, image_features=images
            )
            embeds = embeds.masked_scatter(mask, images)
        if encoded.get("video") is not None:
            videos = _cat(encoded["video"].pooler_output).to(embeds.device, embeds.dtype)
            _, mask = vision.get_placeholder_mask(
                input_ids, inputs_embeds=embeds, video_features=videos
            )
            embeds = embeds.masked_scatter(mask, videos)
        return Prefill(prepared, start, embeds, positions, rope_delta)

    def _chunk(self, prefill: Prefill) -> Any:
        """Runs one chunk through the text model into the prefill's own cache; after the last,
        moves the cache into the row's range and returns the last position's logits."""
        from transformers import DynamicCache

        total = prefill.prepared.prompt_tokens
        begin = prefill.done
        end = total if not self.chunk_tokens else min(total, begin + self.chunk_tokens)
        if prefill.cache is None:
            prefill.cache = DynamicCache(config=self.model.config.text_config)
        output = self.text_model(
            inputs_embeds=prefill.embeds[:, begin:end],
            position_ids=prefill.positions[..., begin:end],
            cache=prefill.cache,
            use_cache=True,
        )
        prefill.done = end
        if end < total:
            return None
        for index, layer in enumerate(prefill.cache.layers):
            self.pool.write(index, prefill.start, layer.keys[0], layer.values[0])
        prefill.cache = None
        hidden = output.last_hidden_state[:, -1, :]
        return self.model.lm_head(hidden).float()

    # -- stepping --------------------------------------------------------------------------------

    def step(self) -> list[Row]:
        """One token for every row; returns the rows that ended (the caller frees them).

        The step's forward pass is queued first. Then the host reads the tokens the step before
        chose, if they are still unread (`ahead`), and does each row's work for them: stream,
        stop strings, limit; then each grammar's mask for this step, on the CPU while the device
        runs the pass. This step's tokens are chosen on the device (greedy rows together,
        sampled rows with their own generators) and copied to the host: read at once, or with
        `ahead` in the next step, once its pass is queued, so that the host's work overlaps
        the device's next step. Either way a step reads the device once.

        Every row gets the same tokens either way. Ahead, a row that ends on the token read late
        (end of text, stop string) takes part in one pass for nothing, in its own range; a row
        whose unread token is its last by `max_new_tokens` is left out of the pass."""
        import torch

        pending, self.pending = self.pending, None
        waiting = {} if pending is None else {r: i for i, r in enumerate(pending.rows) if r}
        rows = [
            row
            for row in self.rows
            if not (row in waiting and len(row.generated) + 1 >= row.request.max_new_tokens)
        ]
        with torch.inference_mode():
            logits = None
            if rows:
                tokens = None if pending is None else self._fed(rows, waiting, pending.choices)
                logits = self._logits(rows, tokens)  # queued on the device; nothing read yet
                for row in rows:
                    row.cached += 1
            ended = self._settle(pending)
            left = set(ended)  # each row leaves once
            going = []
            for row in rows:
                if row in left:
                    continue
                if row.ctx.should_stop():
                    ended.append(row)
                    continue
                row.sampler.prepare(row.generated[-1])
                going.append(row)
            if going:
                choices = self._choices(rows, going, logits)
                chosen = set(going)
                decoding = [row if row in chosen else None for row in rows]
                self.pending = Pending(decoding, choices, self.late.send(choices))
        if not self.ahead:
            ended += self._settle(self.pending)
            self.pending = None
        return ended

    def _fed(self, rows: list[Row], waiting: dict[Row, int], choices: Any) -> Any:
        """The token each row feeds, on the device [rows]: the one the last step chose for it,
        unread (`choices`, at `waiting`'s index), or its last known one (it joined since)."""
        import torch

        count = len(choices)
        known = [0 if row in waiting else row.generated[-1] for row in rows]
        index = [waiting.get(row, count + number) for number, row in enumerate(rows)]
        host = torch.tensor(known + index).to(self.device, non_blocking=True)
        return torch.cat([choices, host[: len(rows)]])[host[len(rows) :]]

    def _settle(self, pending: Pending | None) -> list[Row]:
        """Reads the tokens the last step chose and gives each row still decoding its own;
        returns the rows that ended, or stopped, with it."""
        if pending is None:
            return []
        tokens = self.late.read(pending.copy).tolist()
        live = set(self.rows)
        ended = []
        for row, token in zip(pending.rows, tokens, strict=True):
            if row is None or row not in live or row.ended is not None:
                continue  # it was not decoding, it left, or it ended before this token
            if row.ctx.should_stop():
                ended.append(row)
                continue
            row.take(token)
            if row.ended is not None:
                ended.append(row)
        return ended

    def _choices(self, rows: list[Row], going: list[Row], logits: Any) -> Any:
        """Each row's next token [rows] on the device, nothing read: greedy rows in one go, the
        others (sampled, penalised) one by one; a row not `going` gets its argmax, never used."""
        choices = self._greedy(rows, logits)
        going_rows = set(going)
        for index, row in enumerate(rows):
            if row in going_rows and not (row.sampler.plain_greedy or row.sampler.masked_greedy):
                choices[index : index + 1] = self._pick(row, logits[index : index + 1])
        return choices

    def _greedy(self, rows: list[Row], logits: Any) -> Any:
        """Every row's argmax [rows] on the device, the greedy rows with a grammar masked first
        (all in one go), so the host reads them all at once rather than one per row."""
        import torch

        from hunyuan_service.models.grammar import mask_scores

        masked = [
            index
            for index, row in enumerate(rows)
            if row.sampler.masked_greedy and row.sampler.grammar.live
        ]
        choices = logits.argmax(dim=-1)
        if masked:
            grammars = [rows[index].sampler.grammar for index in masked]
            bitmask = torch.cat([grammar.bitmask for grammar in grammars])
            if self.bits is None:
                self.bits = torch.arange(32, dtype=torch.int32, device=logits.device)
            at = torch.tensor(masked).to(logits.device, non_blocking=True)
            scores = mask_scores(logits[at], bitmask, grammars[0].vocab, self.bits)
            choices[at] = scores.argmax(dim=-1)
        return choices

    def stopped(self) -> list[Row]:
        """Rows whose job stopped (cancelled, deadline, shutdown) since the last step."""
        return [row for row in self.rows if row.ctx.should_stop()]

    def free(self, row: Row) -> None:
        self.rows.remove(row)
        self.pool.release(row.start, row.reserved)
        if not self.rows:
            self.pending = None

    def pad_steps(self, max_rows: int, capture: bool, compiled: bool = False) -> None:
        """Runs every later step at bucketed shapes: as CUDA graphs captured now when `capture`
        (CUDA only), else eagerly (how tests check the padding on the CPU); `compiled` compiles
        the step for every bucket now, before any capture."""
        import functools

        import torch

        from hunyuan_service.models.decoding.graphs import PaddedStep

        forward = self._forward
        if compiled:
            # One compiled function for every layer (its weights and KV pool are arguments),
            # so compiling costs one layer, not the 28-layer step unrolled.
            layer = torch.compile(decoder_layer, dynamic=True)
            forward = functools.partial(self._forward, layer_step=layer)
        capacity = self.pool.capacity
        self.padded = PaddedStep(
            forward,
            self.pool.scratch,
            max_rows,
            capacity,
            budget=2 * max(capacity, max_rows * 256),
            device=self.device,
            capture=capture,
            compiled=compiled,
            eager=self._forward,
        )
        self.padded.prepare()

    def _logits(self, rows: list[Row], tokens: Any = None) -> Any:
        """Float logits [rows, vocab] for each row's next token, queued on the device; `tokens`
        [rows] on the device, when given, are the tokens fed in place of each row's last."""

        values = [
            [row.generated[-1] for row in rows],
            [row.start + row.cached for row in rows],
            [row.cached + row.rope_delta for row in rows],
            [row.cached + 1 for row in rows],
            [row.start for row in rows],
        ]
        width = max(row.cached for row in rows) + 1
        if self.padded is not None:
            return self.padded.run(values, width, tokens)
        return self._forward(step_inputs(values, self.device, tokens), width).float()

    def _forward(self, inputs: Any, width: int, layer_step: Any = None) -> Any:
        """Logits [rows, vocab] for each row's next token at its own position.

        `inputs` [5, rows] holds each row's last token, its position in the pool, its rotary
        position, its length with that token, and its range's start (graphs.TOKEN ... START);
        attention reads `width` positions per row, those past its length masked. Nothing here
        reads the device or depends on values, so a CUDA graph can capture it. `layer_step`
        runs each decoder layer (`decoder_layer`, or a compiled one).
        """
        import torch

        tokens, at, rotary, lengths, starts = inputs
        offsets = torch.arange(width, device=inputs.device)
        valid = offsets[None, :] < lengths[:, None]  # [rows, width]
        index = starts[:, None] + torch.minimum(offsets[None, :], lengths[:, None] - 1)
        mask = attention_mask(valid, self.model.dtype)

        model = self.text_model
        hidden = model.embed_tokens(tokens[:, None])  # [rows, 1, hidden]
        cos, turn = self.rotations(rotary)
        step = layer_step or decoder_layer
        pools = self.pool.layers
        for layer, joined, pool in zip(model.layers, self.joined, pools, strict=True):
            hidden = step(layer, joined, pool, hidden, cos, turn, at, index, mask)
        return self.model.lm_head(rms_norm(model.norm, hidden)[:, -1, :])

    def _choose(self, row: Row, logits: Any) -> int:
        return int(self._pick(row, logits))

    def _pick(self, row: Row, logits: Any) -> Any:
        """The row's next token from `logits` [1, vocab], as a tensor [1] on the device."""
        import torch

        # Only the repetition penalty reads the row's history; warpers ignore it.
        ids = None
        if row.sampler.processors:
            history = torch.tensor([row.prompt_ids + row.generated])
            ids = history.to(logits.device, non_blocking=True)
        return row.sampler.pick(ids, logits)

    def decode(self, tokens: list[int]) -> str:
        return str(
            self.tokenizer.decode(
                tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )

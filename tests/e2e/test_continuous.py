"""Continuous batching on the tiny Qwen2.5-VL: rows join and leave between steps, each keeping
every promise it has alone (tokens, sampling, stops, grammar, streams, cancel, deadline)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from hunyuan_service.engine.engine import Engine
from hunyuan_service.engine.events import Succeeded, Token
from hunyuan_service.engine.jobs import JobStatus, StopReason
from hunyuan_service.errors import DeadlineExceeded, InvalidInput, JobCancelled
from hunyuan_service.models.base import JobContext
from hunyuan_service.models.decoding.rows import Row
from hunyuan_service.models.types import ChatMessage, Image2TextInput
from tests.continuous_feed import ListFeed, run_together
from tests.e2e.conftest import tiny_settings
from tests.host_reads import HostReads
from tests.images import png_bytes


def ask(text: str, tokens: int, **options: Any) -> Image2TextInput:
    return Image2TextInput((ChatMessage("user", text),), max_new_tokens=tokens, **options)


@pytest.fixture(scope="module")
def continuous(tiny_cache: Path) -> Any:
    """The tiny Qwen with the continuous decoder (MAX_BATCH_SIZE 4)."""
    from hunyuan_service.models.qwen_vl import QwenVLModel

    model = QwenVLModel(tiny_settings("image2text", tiny_cache, max_batch_size=4))
    model.load()
    assert model.decodes_continuously()
    return model


@pytest.mark.parametrize(
    ("chunk", "padded", "ahead"),
    [
        (512, False, False),
        (16, False, False),
        (512, True, False),
        (512, False, True),
        (16, True, True),
    ],
)
def test_every_row_equals_its_solo_answer(
    continuous: Any, chunk: int, padded: bool, ahead: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With 16, every prompt (55 to 75 tokens, an image's among them) runs in several chunks.
    monkeypatch.setattr(continuous.decoder, "chunk_tokens", chunk)
    # DECODE_AHEAD: each step's tokens are fed to the next step unread, and read a step later.
    monkeypatch.setattr(continuous.decoder, "ahead", ahead)
    # Padded: every step at the shapes CUDA graphs capture (rows and width in buckets, the
    # padding rows on the scratch position), run eagerly here.
    monkeypatch.setattr(continuous.decoder, "padded", None)
    if padded:
        continuous.decoder.pad_steps(16, capture=False)  # this test hands over 9 jobs at once
    groups: list[int] = []  # prompts prefilled together, per forward pass
    together_fn = continuous.decoder.advance_together

    def counted(prefills: list[Any]) -> Any:
        groups.append(len(prefills))
        return together_fn(prefills)

    monkeypatch.setattr(continuous.decoder, "advance_together", counted)
    masked: list[int] = []  # greedy rows with a grammar, masked together, per step
    greedy_fn = continuous.decoder._greedy

    def spied(rows: list[Any], logits: Any) -> Any:
        masked.append(sum(row.sampler.masked_greedy for row in rows))
        return greedy_fn(rows, logits)

    monkeypatch.setattr(continuous.decoder, "_greedy", spied)
    from hunyuan_service.media import decode_image
    from hunyuan_service.models.grammar import compile_response_format

    image = decode_image(png_bytes(), "images[0]", continuous.settings)
    schema = {"type": "array", "items": {"enum": ["cat", "dog"]}, "minItems": 1, "maxItems": 3}
    numbers = {"type": "array", "items": {"enum": [1, 22, 333]}, "minItems": 1, "maxItems": 4}
    requests = {
        "greedy": ask("Hi", 12),
        "image": Image2TextInput((ChatMessage("user", "Describe this", (image,)),), 6),
        "penalty": ask("Say it again and again", 9, repetition_penalty=1.3),
        "seeded": ask("Surprise me", 10, temperature=0.9, top_p=0.95, seed=11),
        "seeded, hot": ask("Surprise me", 10, temperature=1.4, seed=12),
        "stop": ask("go", 12),
        "grammar": ask("Pets?", 40, grammar=compile_response_format("json_schema", schema, "pets")),
        "grammar, numbers": ask(
            "Numbers?", 40, grammar=compile_response_format("json_schema", numbers, "numbers")
        ),
        "grammar, sampled": ask(
            "Pets?",
            40,
            temperature=1.0,
            seed=3,
            grammar=compile_response_format("json_schema", schema, "pets"),
        ),
    }
    full = continuous.infer(requests["stop"], JobContext()).text
    requests["stop"] = ask("go", 12, stop=(full[3:5],))
    # MAX_BATCH_SIZE=1's path, today's `generate`, alone for each request:
    solo = {key: continuous.infer(request, JobContext()) for key, request in requests.items()}
    tokens: dict[str, list[str]] = {key: [] for key in requests}
    contexts = {key: JobContext(on_token=tokens[key].append) for key in requests}
    together = run_together(continuous, requests, contexts).outcomes
    for key, alone in solo.items():
        assert together[key].text == alone.text, key
        if key != "stop":
            assert together[key] == alone, key  # token counts and finish reason too
            assert "".join(tokens[key]) == together[key].text, key  # only its own stream
    # The model streams up to the token that completed the stop string; the renderers cut it.
    assert "".join(tokens["stop"]).startswith(together["stop"].text)
    # A stop string ends the row as soon as the decoded text holds it; `generate` matches stop
    # strings against token strings, which byte-level tokens can miss, and ran on to its limit.
    assert together["stop"].text == full[: full.index(full[3:5])]
    assert together["stop"].finish_reason == "stop"
    assert together["stop"].completion_tokens < 12
    assert together["seeded"].text != together["seeded, hot"].text
    for key in ("grammar", "grammar, sampled"):
        assert together[key].finish_reason == "stop"
        jsonschema.validate(json.loads(together[key].text), schema)
    # Two greedy rows with different grammars, masked together, each by its own.
    assert max(masked) == 2
    assert together["grammar, numbers"].finish_reason == "stop"
    jsonschema.validate(json.loads(together["grammar, numbers"].text), numbers)
    # Prompts of 55 to 75 tokens: several fit a chunk of 512 together; none fit 16.
    assert (max(groups, default=1) > 1) == (chunk == 512)
    assert all(size * 75 <= chunk for size in groups)
    if padded:
        steps = continuous.decoder.padded
        assert steps.padded_steps > 0
        assert steps.eager_steps == 0
        assert steps.padded_rows > 0  # some steps ran fewer rows than their bucket


@pytest.mark.parametrize("pieces", [1, 3])
@pytest.mark.parametrize("ahead", [False, True])
def test_a_row_that_stops_leaves_while_its_neighbours_finish(
    continuous: Any, ahead: bool, pieces: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(continuous.decoder, "ahead", ahead)
    requests = {f"r{i}": ask(f"question {i}", 8) for i in range(3)}
    solo = {key: continuous.infer(request, JobContext()) for key, request in requests.items()}
    assert solo["r1"].completion_tokens == 8  # alone, r1 would run to its limit
    streamed: dict[str, list[str]] = {key: [] for key in requests}
    contexts = {key: JobContext(on_token=streamed[key].append) for key in requests}
    # r1 stops (its client left, or its deadline passed) once r0 has streamed some text: its
    # first token's, streamed when it joined (before any step), or its third piece, streamed
    # within a step just before r1's own token is taken.
    contexts["r1"] = JobContext(
        should_stop=lambda: len(streamed["r0"]) >= pieces,
        on_token=streamed["r1"].append,
        stop_reason=lambda: "deadline",
    )
    feed = run_together(continuous, requests, contexts)
    assert isinstance(feed.outcomes["r1"], JobCancelled)
    assert feed.outcomes["r1"].code == "deadline"
    assert feed.order[0] == "r1"  # it left at once, before the others ended
    assert [feed.outcomes["r0"], feed.outcomes["r2"]] == [solo["r0"], solo["r2"]]
    assert len("".join(streamed["r1"])) < len(solo["r1"].text)
    assert continuous.decoder.pool.free_positions == continuous.decoder.pool.capacity


@pytest.mark.parametrize("ahead", [False, True])
def test_decode_ahead_reads_each_steps_tokens_only_after_queuing_the_next_step(
    continuous: Any, ahead: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = continuous.decoder
    monkeypatch.setattr(decoder, "ahead", ahead)
    monkeypatch.setattr(decoder, "padded", None)
    full = continuous.infer(ask("go", 12), JobContext()).text
    requests = {
        "length": ask("question 1", 8),  # runs to its limit
        "end": ask("Hi", 12),  # the tiny model's end of text comes at its 8th token
        "stop": ask("go", 12, stop=(full[3:5],)),
    }
    runs: dict[str, list[str]] = {}
    outcomes: dict[str, Any] = {}
    forward, take = decoder._forward, Row.take
    for key, request in requests.items():
        events: list[str] = []
        runs[key] = events

        def logged_forward(*args: Any, log: list[str] = events, **kwargs: Any) -> Any:
            log.append("step")
            return forward(*args, **kwargs)

        def logged_take(row: Any, *args: Any, log: list[str] = events) -> None:
            log.append("token")  # the host has the token: it streams and checks stops
            take(row, *args)

        monkeypatch.setattr(decoder, "_forward", logged_forward)
        monkeypatch.setattr(Row, "take", logged_take)
        outcomes[key] = run_together(continuous, {key: request}).outcomes[key]
    monkeypatch.setattr(Row, "take", take)
    for key in ("length", "end"):
        assert outcomes[key] == continuous.infer(requests[key], JobContext()), key
    assert outcomes["stop"].text == full[: full.index(full[3:5])]
    assert outcomes["length"].finish_reason == "length"
    assert outcomes["end"].finish_reason == "stop"
    assert outcomes["end"].completion_tokens < 12
    length = runs["length"]
    assert length.count("token") == 8  # the first comes from the prefill, before any step
    assert length.count("step") == 7  # the last token, known to be the last, feeds no step
    # Steps queued before the host had the k-th token: k - 1 in order, k ahead (the step that
    # feeds it was queued unread); the last needs no step.
    queued = [length[:at].count("step") for at, event in enumerate(length) if event == "token"]
    if ahead:
        assert queued == [0, *range(2, 8), 7]
    else:
        assert queued == list(range(8))
    # An end of text or a stop string is seen a step late ahead: one step runs for nothing.
    for key in ("end", "stop"):
        tokens = outcomes[key].completion_tokens
        assert runs[key].count("token") == tokens, key
        assert runs[key].count("step") == tokens - 1 + ahead, key
    assert decoder.pool.free_positions == decoder.pool.capacity


@pytest.mark.parametrize("ahead", [False, True])
def test_a_step_reads_the_device_once_whatever_its_rows(
    continuous: Any, ahead: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each read of a tensor's value inside a step, by the function that reads it: on a GPU each
    waits for the device, unless it reads a copy already made (DECODE_AHEAD's)."""
    from hunyuan_service.models.grammar import compile_response_format

    decoder = continuous.decoder
    monkeypatch.setattr(decoder, "ahead", ahead)
    monkeypatch.setattr(decoder, "padded", None)
    counted = HostReads(within="step")
    steps = []
    step = decoder.step

    def counted_step() -> Any:
        steps.append(len(decoder.rows))
        with counted:
            return step()

    monkeypatch.setattr(decoder, "step", counted_step)
    schema = {"type": "array", "items": {"enum": ["cat", "dog"]}, "minItems": 1, "maxItems": 3}
    pets = compile_response_format("json_schema", schema, "pets")
    requests = {  # a row of every kind
        "greedy": ask("Hi", 12),
        "penalty": ask("Say it again and again", 9, repetition_penalty=1.3),
        "seeded": ask("Surprise me", 10, temperature=0.9, top_p=0.95, seed=11),
        "grammar": ask("Pets?", 40, grammar=pets),
        "grammar, sampled": ask("Pets?", 40, temperature=1.0, seed=3, grammar=pets),
    }
    outcomes = run_together(continuous, requests).outcomes
    assert all(not isinstance(outcome, Exception) for outcome in outcomes.values())
    # One read a step, of every row's token (greedy, sampled, penalised, constrained): this
    # step's, or ahead the step before's, copied to the host then.
    assert set(counted.sites) == {("batch.py", "_settle")}
    reads = counted.sites[("batch.py", "_settle")]
    assert reads == len(steps) if not ahead else len(steps) - 1 <= reads <= len(steps)


@pytest.mark.parametrize("limit", ["KV cache", "rotary positions"])
def test_a_request_past_the_decoders_room_is_refused_with_its_range_given_back(
    tiny_cache: Path, limit: str
) -> None:
    from hunyuan_service.models.decoding.layer import Rotations
    from hunyuan_service.models.qwen_vl import QwenVLModel

    settings = tiny_settings(
        "image2text", tiny_cache, max_batch_size=2, kv_cache_tokens=80, max_input_tokens=256
    )
    model = QwenVLModel(settings)
    model.load()
    decoder = model.decoder
    assert decoder.pool.capacity == 80
    # The prompt is 58 tokens: 58 + 60 new ones pass the pool's 80 positions.
    far, says = ask("hello", 60), "KV_CACHE_TOKENS"
    if limit == "rotary positions":
        # The rotation table covers the model's own limit, which no tiny request reaches; a
        # shorter one stands in for a video whose rotary positions run ahead of its tokens.
        decoder.rotations = Rotations(decoder.text_model, 66)
        far, says = ask("hello", 10), "rotary positions"
    feed = run_together(model, {"far": far, "near": ask("hello", 5)})
    refused = feed.outcomes["far"]
    assert isinstance(refused, InvalidInput)
    assert refused.param == "messages"
    assert says in refused.message
    assert feed.outcomes["near"].completion_tokens == 5
    assert decoder.pool.free_positions == 80  # every range given back


# -- through the engine: joining, leaving, capacity --------------------------------------------


async def started_engine(tiny_cache: Path, **settings: Any) -> Engine:
    from hunyuan_service.models.qwen_vl import QwenVLModel

    options = {"max_batch_size": 4, "max_new_tokens_limit": 4096, **settings}
    model = QwenVLModel(tiny_settings("image2text", tiny_cache, **options))
    engine = Engine(model.settings, model)
    await engine.start()
    # Random weights may end a text early; these tests need rows of the length they ask for.
    model.model.generation_config.eos_token_id = None
    model.decoder.eos = frozenset()
    return engine


async def until(condition: Any) -> None:
    """Polls a condition that no event announces (the bound is the test's own timeout)."""
    while not condition():  # noqa: ASYNC110
        await asyncio.sleep(0.01)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=600))


async def first_token(handle: Any) -> None:
    async for _number, event in handle.events():
        if isinstance(event, Token):
            return


def test_a_short_request_joins_a_long_one_and_finishes_first(tiny_cache: Path) -> None:
    async def scenario() -> None:
        engine = await started_engine(tiny_cache)
        long = engine.submit(ask("Tell me everything", 2000), "long", observed=True)
        await first_token(long)
        short = engine.submit(ask("Hi", 4), "short", observed=True)
        await short.wait_finished()
        # The short one got its first token, and its whole answer, while the long one decodes.
        assert not long.finished
        assert short.status is JobStatus.SUCCEEDED
        assert short.output.completion_tokens == 4
        texts = [e.text for _n, e in [x async for x in short.events()] if isinstance(e, Token)]
        assert "".join(texts) == short.output.text
        long.cancel()
        await long.wait_finished()
        assert long.status is JobStatus.CANCELLED
        await until(lambda: engine.scheduler.running == [])  # its row left at the next step
        solo = engine.model.infer(ask("Hi", 4), JobContext())
        assert short.output == solo
        await engine.stop()

    run(scenario())


@pytest.mark.parametrize("ahead", [False, True])
def test_rows_wait_for_kv_room_rather_than_fail(tiny_cache: Path, ahead: bool) -> None:
    async def scenario() -> None:
        # Room for one 55-token prompt plus 40 new tokens at a time, not two.
        engine = await started_engine(tiny_cache, kv_cache_tokens=150, decode_ahead=ahead)
        decoder = engine.model.decoder
        rows_per_step: list[int] = []
        step = decoder.step

        def counted_step() -> Any:
            rows_per_step.append(len(decoder.rows))
            return step()

        decoder.step = counted_step  # observes how many rows each step decoded
        first = engine.submit(ask("first question", 40), "a", observed=True)
        second = engine.submit(ask("second question", 40), "b", observed=True)
        await first.wait_finished()
        await second.wait_finished()
        # Both were handed to the decoder at once, but their ranges never fit together.
        assert engine.scheduler.batch_sizes.sum == 1 + 2
        assert set(rows_per_step) == {1}
        # Each row alone, one after the other; ahead, a row's last token is read in one more
        # step, which runs no pass.
        assert len(rows_per_step) == 2 * (39 + ahead)
        assert [first.status, second.status] == [JobStatus.SUCCEEDED] * 2
        assert second.output == engine.model.infer(ask("second question", 40), JobContext())
        assert engine.model.decoder.pool.free_positions == 150
        await engine.stop()

    run(scenario())


@pytest.mark.parametrize("ahead", [False, True])
def test_a_deadline_or_a_cancel_ends_only_its_own_row(tiny_cache: Path, ahead: bool) -> None:
    async def scenario() -> None:
        engine = await started_engine(tiny_cache, decode_ahead=ahead)
        late = engine.submit(ask("one", 2000), "late", observed=True)
        gone = engine.submit(ask("two", 2000), "gone", observed=True)
        kept = engine.submit(ask("three", 30), "kept", observed=True)
        await asyncio.gather(first_token(late), first_token(gone))
        late._job.deadline = time.monotonic()  # its time runs out mid-decode
        gone.cancel(StopReason.CLIENT_GONE)
        await kept.wait_finished()
        await late.wait_finished()
        assert kept.status is JobStatus.SUCCEEDED
        assert kept.output == engine.model.infer(ask("three", 30), JobContext())
        assert late.status is JobStatus.EXPIRED
        assert isinstance(late.error, DeadlineExceeded)
        assert gone.status is JobStatus.CANCELLED
        counters = engine.scheduler.counters
        assert counters["cancelled_running_deadline"] == 1
        await engine.stop()

    run(scenario())


@pytest.mark.parametrize("ahead", [False, True])
def test_the_drain_deadline_ends_running_rows_with_a_503(tiny_cache: Path, ahead: bool) -> None:
    async def scenario() -> None:
        engine = await started_engine(tiny_cache, shutdown_timeout_s=0.5, decode_ahead=ahead)
        rows = [engine.submit(ask(f"q{i}", 4000), f"r{i}", detached=True) for i in range(2)]
        await first_token_of_all(rows)
        await engine.stop()
        for handle in rows:
            assert handle.status is JobStatus.FAILED
            assert handle.error.code == "shutdown"

    run(scenario())


async def first_token_of_all(handles: list[Any]) -> None:
    await asyncio.gather(*(first_token(handle) for handle in handles))


def test_static_batches_stay_available(tiny_cache: Path) -> None:
    from hunyuan_service.models.qwen_vl import QwenVLModel

    settings = tiny_settings("image2text", tiny_cache, max_batch_size=4, continuous_batching=False)
    model = QwenVLModel(settings)
    model.load()
    assert not model.decodes_continuously()
    assert model.decoder is None


def test_the_decode_ahead_setting_reaches_the_continuous_decoder(tiny_cache: Path) -> None:
    from hunyuan_service.models.qwen_vl import QwenVLModel

    settings = tiny_settings("image2text", tiny_cache, max_batch_size=4, decode_ahead=True)
    model = QwenVLModel(settings)
    model.load()
    assert model.decoder.ahead is True
    assert model.info.extra["decode_ahead"] is True
    requests = {"a": ask("Hi", 12), "b": ask("question 1", 8)}
    solo = {key: model.infer(request, JobContext()) for key, request in requests.items()}
    steps = []
    step = model.decoder.step

    def counted() -> Any:
        steps.append((len(model.decoder.rows), model.decoder.pending is not None))
        return step()

    model.decoder.step = counted
    assert run_together(model, requests).outcomes == solo
    assert max(rows for rows, _ in steps) == 2  # both decoded together
    assert sum(unread for _, unread in steps) == len(steps) - 1  # each step's tokens read late


def test_succeeded_events_end_every_stream(tiny_cache: Path) -> None:
    async def scenario() -> None:
        engine = await started_engine(tiny_cache)
        handles = [engine.submit(ask(f"q{i}", 5 + i), f"r{i}", observed=True) for i in range(4)]
        for handle in handles:
            events = [e for _n, e in [x async for x in handle.events()]]
            assert isinstance(events[-1], Succeeded)
            text = "".join(e.text for e in events if isinstance(e, Token))
            assert text == handle.output.text  # each stream carries its own tokens only
        await engine.stop()

    run(scenario())


class ScriptedFeed(ListFeed):
    """Hands over `first` at once, and `later` at the decoder's `after`-th look for work."""

    def __init__(self, first: list, later: list, after: int) -> None:
        super().__init__(first)
        self.later, self.after, self.looks = later, after, 0

    def take(self) -> list[tuple[Any, Image2TextInput, JobContext]]:
        self.looks += 1
        if self.looks == self.after:
            self.jobs += self.later
        return super().take()

    def close_if_idle(self) -> bool:
        return not self.jobs and self.looks > self.after


def test_a_joining_prompt_runs_a_chunk_between_two_steps(
    continuous: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = continuous.decoder
    monkeypatch.setattr(decoder, "chunk_tokens", 16)  # prompts of 55-60 tokens: 4 chunks each
    calls: list[str] = []
    advance, step = decoder.advance, decoder.step

    def recorded_advance(prefill: Any) -> Any:
        calls.append("chunk")
        return advance(prefill)

    def recorded_step() -> Any:
        calls.append("step")
        return step()

    monkeypatch.setattr(decoder, "advance", recorded_advance)
    monkeypatch.setattr(decoder, "step", recorded_step)
    first = {f"long{i}": ask(f"long question {i}", 30) for i in range(2)}
    later = {f"short{i}": ask(f"short question {i}", 4) for i in range(3)}
    feed = ScriptedFeed(
        [(k, r, JobContext()) for k, r in first.items()],
        [(k, r, JobContext()) for k, r in later.items()],
        after=8,
    )
    continuous.serve_continuously(feed)
    # Nothing decodes yet: the first prompt runs its chunks back to back. From then on, rows
    # decode, and every later chunk waits for a step after the one before it.
    first_step = calls.index("step")
    assert set(calls[:first_step]) == {"chunk"}
    assert "chunk chunk" not in " ".join(calls[first_step:])
    prompts = [
        decoder.prepare(r, JobContext(), k).prompt_tokens for k, r in {**first, **later}.items()
    ]
    assert calls.count("chunk") == sum(-(-tokens // 16) for tokens in prompts)
    # Chunked or not, every answer is the one `generate` gives alone.
    for key, request in {**first, **later}.items():
        assert feed.outcomes[key] == continuous.infer(request, JobContext()), key
    assert decoder.pool.free_positions == decoder.pool.capacity


def test_a_compiled_step_compiles_every_bucket_at_load_and_never_after(
    tiny_cache: Path, continuous: Any
) -> None:
    from hunyuan_service.models.compilations import compilations, install
    from hunyuan_service.models.qwen_vl import QwenVLModel

    install()
    before = compilations()
    settings = tiny_settings("image2text", tiny_cache, max_batch_size=4, compile="full")
    compiled = QwenVLModel(settings)
    compiled.load()
    loaded = compilations()
    assert loaded > before  # compiled at load, for every bucket
    steps = compiled.decoder.padded
    assert steps.compiled
    assert compiled.info.extra["decode_step"] == "compiled"
    requests = {
        "one": ask("Hi", 12),
        "two": ask("Tell me a long story about the sea", 30),
        "three": ask("Surprise me", 10, temperature=0.9, seed=5),
        "four": ask("Go", 3),
    }
    # The one-at-a-time path (transformers' own compiled decode) compiles on first use.
    alone = {key: compiled.infer(request, JobContext()) for key, request in requests.items()}
    eager = run_together(continuous, requests).outcomes
    loaded = compilations()
    for count in (1, 2, 4):  # every row bucket, and rows leaving mid-way
        chosen = dict(list(requests.items())[:count])
        together = run_together(compiled, chosen).outcomes
        for key in chosen:
            assert together[key] == eager[key], key
    assert together["one"].text == alone["one"].text
    assert steps.padded_steps > 0
    assert steps.eager_steps == 0
    assert compilations() == loaded


def test_a_request_that_cannot_join_fails_its_shared_prefill_with_every_range_back(
    continuous: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = continuous.decoder
    free = decoder.pool.free_positions
    join = decoder._join

    def failing(prefill: Any, logits: Any) -> Any:
        if prefill.key == "b":
            raise RuntimeError("the sampler broke")
        return join(prefill, logits)

    monkeypatch.setattr(decoder, "_join", failing)
    requests = {key: ask(f"Hi {key}", 4) for key in ("a", "b", "c")}
    feed = run_together(continuous, requests)
    # The three prompts shared a pass, so all three fail with it; each is reported once.
    assert sorted(feed.order) == ["a", "b", "c"]
    assert all(isinstance(feed.outcomes[key], RuntimeError) for key in requests)
    assert decoder.rows == []
    assert decoder.pool.free_positions == free

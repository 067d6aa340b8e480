"""bench/gpu.py's `concurrency` section: image2text served continuously to 1 to 64 clients.

Through the engine (the service minus HTTP), with MAX_BATCH_SIZE 64 and the continuous decoder:
waves of 1, 8, 32 and 64 concurrent requests of `new_tokens` greedy tokens each, twice per size
(the first wave of a new size against the second: nothing may compile or grow then). It reports
aggregate decode tokens/s, the time per output token, the batch-1 rate as a share of the GPU's
memory bandwidth (the bytes one decode step reads times tokens/s, over the peak it names), and
one row over HTTP at 8 clients.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

# Peak memory bandwidth by the vendors' datasheets, in bytes/s; other devices are measured.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "A100-SXM4-80GB": 2.039e12}
CLIENTS = (1, 8, 32, 64)


def concurrency_section(name: str, shape: Any, plan: Any, report: Any) -> None:
    import gpu as bench
    from hunyuan_service.models.base import resolve_dtype

    dtype = resolve_dtype("auto", plan.device)
    with bench.made_on(plan.device, dtype, seed=2):
        model, processor = bench_model(shape, dtype)
    model.generation_config.eos_token_id = None  # exactly new_tokens per request
    bytes_per_step = decode_bytes(model)
    peak, peak_name = peak_bandwidth(plan.device)
    served, rates, texts = _variant(model, processor, plan, report, name, CLIENTS)

    def bandwidth_row(label: str, rate: float) -> None:
        report.add(
            section=name,
            variant=f"{label}batch 1 as a share of memory bandwidth",
            tok_per_s=rate,
            note=f"{bytes_per_step * rate / peak:.1%} of {peak_name} ({peak / 1e12:.2f} TB/s): "
            f"each step reads {bytes_per_step / 1e9:.2f} GB of weights",
        )

    if 1 in rates:
        bandwidth_row("", rates[1])
    if plan.profile:
        _profiled_steps(served, plan, report, name)

    def constrained(served: Any, unconstrained: dict[int, float], label: str) -> None:
        """The same waves held to a JSON schema that stays open for all their tokens."""
        from hunyuan_service.models.grammar import compile_response_format

        if plan.left() < 60:
            return
        grammar = compile_response_format("json_schema", bench.RECORDS_SCHEMA, "records")
        waves = _engine_waves(
            served.settings, served, plan.new_tokens, plan, report,
            f"{name}, {label}JSON-schema constraint", (1, 8), grammar,
        )  # fmt: skip
        held, _texts = asyncio.run(waves)
        _compare(report, name, f"{label}JSON-schema constraint vs without", held, unconstrained)

    constrained(served, rates, "")
    if plan.left() > 90:
        # DECODE_AHEAD: each step queued before the host reads the last one's tokens.
        other, ahead, ahead_texts = _variant(
            model, processor, plan, report, f"{name}, DECODE_AHEAD", (1, 8, 32), decode_ahead=True
        )
        _compare(report, name, "DECODE_AHEAD vs CUDA graphs", ahead, rates, ahead_texts, texts)
        if 1 in ahead:
            bandwidth_row("DECODE_AHEAD, ", ahead[1])
        constrained(other, ahead, "DECODE_AHEAD, ")
        other.decoder = None
    if plan.device == "cuda" and plan.left() > 150:
        # COMPILE=full: the step compiled (its small kernels fused), then captured.
        other, compiled, compiled_texts = _variant(
            model, processor, plan, report, f"{name}, COMPILE=full", CLIENTS, compile="full"
        )
        other.decoder = None
        label = "compiled + CUDA graphs vs CUDA graphs"
        _compare(report, name, label, compiled, rates, compiled_texts, texts)
        if 1 in compiled:
            bandwidth_row("COMPILE=full, ", compiled[1])
    if plan.device == "cuda" and plan.left() > 120:
        other, eager, eager_texts = _variant(
            model, processor, plan, report, f"{name}, eager step", (1, 8), cuda_graphs=False
        )
        other.decoder = None
        _compare(report, name, "CUDA graphs vs eager step", rates, eager, texts, eager_texts)
    if plan.left() > 60:
        _http_row(served.settings, served, plan.new_tokens, report, name)
    if plan.left() > 30:
        _image_join(served, plan, report, name)


def _profiled_steps(served: Any, plan: Any, report: Any, name: str) -> None:
    """The continuous decoder's steps under the profiler, at 1 and 32 rows: `new_tokens` steps
    driven straight through the model's continuous serving (no engine), the prefill included
    (one or two passes of the short prompts, spread over the steps)."""
    from tests.continuous_feed import ListFeed

    import gpu as bench
    from gpu_profile import profile, save
    from hunyuan_service.models.base import JobContext
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    n = plan.new_tokens
    for rows in (1, 32):
        if plan.left() < 40:
            return
        jobs = [
            (i, Image2TextInput((ChatMessage("user", f"Describe scene {i}."),), n), JobContext())
            for i in range(rows)
        ]
        feed = ListFeed(jobs)
        found = profile(lambda: served.serve_continuously(feed), plan.device)  # noqa: B023
        done = sum(1 for outcome in feed.outcomes.values() if not isinstance(outcome, Exception))
        label = f"continuous decoder, {rows} rows, {n} steps"
        line = f"{found.line(n, 'step')}; {done} of {rows} rows answered"
        bench.add_profile(report, name, label, line, save(found, report.out, name, label))


def bench_model(shape: Any, dtype: Any) -> tuple[Any, Any]:
    from hunyuan_service.models.tiny import build_qwen_vl

    return build_qwen_vl(shape, dtype=dtype)  # type: ignore[no-any-return]


def _variant(
    model: Any,
    processor: Any,
    plan: Any,
    report: Any,
    name: str,
    sizes: tuple[int, ...],
    **options: Any,
) -> tuple[Any, dict[int, float], dict[int, dict[int, str]]]:
    """The model served with these settings: how its decoder was prepared, then the waves."""
    import gpu as bench
    from hunyuan_service.models.qwen_vl import QwenVLModel

    settings = bench.settings_for(
        "image2text",
        plan,
        max_batch_size=max(CLIENTS),
        max_queue_size=4 * max(CLIENTS),
        kv_cache_tokens=max(CLIENTS) * (256 + plan.new_tokens),
        **options,
    )
    served = QwenVLModel(settings)
    compiled_before = _compilations()
    started = time.perf_counter()
    served.adopt(model, processor)
    loaded = _compilations()
    report.add(
        section=name,
        variant="load: the continuous decoder prepared",
        note=f"decode step: {served.info.extra.get('decode_step')}; KV pool, compilation and "
        f"capture took {time.perf_counter() - started:.1f} s at load "
        f"({loaded - compiled_before} compilations)",
    )
    served.load = lambda: None  # type: ignore[method-assign]  # the weights are in place
    rates, texts = asyncio.run(
        _engine_waves(settings, served, plan.new_tokens, plan, report, name, sizes)
    )
    report.add(
        section=name,
        variant="compilations while serving the waves",
        note=f"{_compilations() - loaded} (torch.compile frames compiled after load)",
    )
    return served, rates, texts


def _compare(
    report: Any,
    name: str,
    label: str,
    rates: dict[int, float],
    baseline: dict[int, float],
    texts: dict | None = None,
    baseline_texts: dict | None = None,
) -> None:
    for clients, base in baseline.items():
        if clients not in rates:
            continue
        note = f"{rates[clients]:.1f} against {base:.1f} tok/s"
        if texts is not None and baseline_texts is not None:
            same = sum(texts[clients][i] == baseline_texts[clients][i] for i in range(clients))
            note += f"; {same} of {clients} answers identical (bf16, padded widths)"
        report.add(
            section=name,
            variant=f"{label}, {clients} clients",
            tok_per_s=rates[clients],
            vs_baseline=rates[clients] / base,
            note=note,
        )


def _compilations() -> int:
    from hunyuan_service.models.compilations import compilations, install

    install()
    return compilations()


async def _engine_waves(
    settings: Any,
    served: Any,
    n: int,
    plan: Any,
    report: Any,
    name: str,
    sizes: tuple[int, ...],
    grammar: Any = None,
) -> tuple[dict[int, float], dict[int, dict[int, str]]]:
    """Two waves of each size (each request held to `grammar`, if given); the rates and answers
    of the second."""
    from hunyuan_service.engine.engine import Engine

    engine = Engine(settings, served)
    await engine.start()
    rates: dict[int, float] = {}
    texts: dict[int, dict[int, str]] = {}
    baseline_tpot = None
    try:
        await _wave(engine, 1, n)  # warm-up
        for clients in sizes:
            if plan.left() < 40:
                report.add(section=name, variant=f"engine, {clients} clients", note="skipped")
                continue
            first = await _wave(engine, clients, n, grammar)
            later = await _wave(engine, clients, n, grammar)
            rates[clients] = clients * (n - 1) / later["decode_s"]
            texts[clients] = later["texts"]
            tpot = later["tpot_s"]
            baseline_tpot = baseline_tpot or tpot
            report.add(
                section=name,
                variant=f"engine, continuous batching, {clients} clients",
                tok_per_s=rates[clients],
                ttft_s=later["ttft_s"],
                vs_baseline=rates[clients] / rates[sizes[0]] if sizes[0] in rates else None,
                note=f"time per output token {tpot * 1000:.2f} ms ({tpot / baseline_tpot:.2f}x "
                f"batch 1); the first wave of this size took "
                f"{first['wall_s'] / later['wall_s']:.2f}x the second",
            )
    finally:
        await engine.stop()
        engine.close()
    return rates, texts


async def _wave(engine: Any, clients: int, n: int, grammar: Any = None) -> dict[str, Any]:
    """`clients` requests at once; the decode rate counts from the last first token to the end."""
    from hunyuan_service.engine.events import Token
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    started = time.perf_counter()
    firsts: list[float] = []
    ends: list[float] = []
    texts: dict[int, str] = {}

    async def one(index: int) -> None:
        message = ChatMessage("user", f"Describe scene {index}.")
        request = Image2TextInput((message,), n, grammar=grammar)
        handle = engine.submit(request, f"c{index}", observed=True)
        async for _number, event in handle.events():
            if isinstance(event, Token):
                firsts.append(time.perf_counter())
                break
        await handle.result()
        ends.append(time.perf_counter())
        assert handle.output.completion_tokens == n, handle.output.completion_tokens
        texts[index] = handle.output.text

    await asyncio.gather(*(one(i) for i in range(clients)))
    tpots = [
        (end - first) / (n - 1) for first, end in zip(sorted(firsts), sorted(ends), strict=True)
    ]
    return {
        "wall_s": max(ends) - started,
        "decode_s": max(ends) - max(firsts),
        "ttft_s": statistics.median(first - started for first in firsts),
        "tpot_s": statistics.median(tpots),
        "texts": texts,
    }


def _http_row(settings: Any, served: Any, n: int, report: Any, name: str) -> None:
    import httpx

    import gpu as bench
    from hunyuan_service.api.app import create_app

    async def clients(url: str, count: int) -> float:
        body = {"prompt": "Describe the scene.", "max_new_tokens": n}
        async with httpx.AsyncClient(timeout=3600) as client:
            started = time.perf_counter()
            answers = await asyncio.gather(
                *(client.post(f"{url}/infer", json=body) for _ in range(count))
            )
            wall = time.perf_counter() - started
        for answer in answers:
            answer.raise_for_status()
        return sum(a.json()["usage"]["completion_tokens"] for a in answers) / wall

    with bench.serve(create_app(settings, served)) as url:
        asyncio.run(clients(url, 8))  # warm-up
        rate = asyncio.run(clients(url, 8))
    report.add(
        section=name,
        variant="whole service over HTTP, 8 clients",
        tok_per_s=rate,
        note="tokens/s over whole requests (prefill included), 8 concurrent POST /infer",
    )


def _image_join(served: Any, plan: Any, report: Any, name: str) -> None:
    """The running rows' longest wait between two steps while a request with four images of
    about a megapixel joins: its vision encoder a block at a time against whole in one turn
    (bench/vision_join.py, which measures the same on the CPU)."""
    import vision_join

    images = vision_join.photos(4, 1008, 980)  # 1,260 tokens each at the default VL_MAX_PIXELS
    found = vision_join.compare(served, images, plan.new_tokens, rounds=2)
    staged, whole = found["a block at a time"], found["encoder whole"]
    report.add(
        section=name,
        variant="4 running rows while a request with 4 one-megapixel images joins",
        note=f"longest wait between two steps {staged['longest_wait_ms']:.1f} ms with the "
        f"encoder a block at a time, {whole['longest_wait_ms']:.1f} ms whole "
        f"({found['wait_ratio']:.2f}x); the joining request's first token "
        f"{found['ttft_ratio']:.2f}x",
    )


def decode_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads: the text layers, final norm and output head."""
    text = model.model.language_model
    parameters = [p for n, p in text.named_parameters() if not n.startswith("embed_tokens")]
    parameters.append(model.lm_head.weight)
    return sum(p.numel() * p.element_size() for p in parameters)


def peak_bandwidth(device: str) -> tuple[float, str]:
    """The device's peak memory bandwidth and where the figure comes from."""
    import torch

    if device == "cuda":
        gpu = torch.cuda.get_device_name()
        for key, peak in PEAK_BANDWIDTH.items():
            if key in gpu:
                return peak, f"the {gpu} datasheet peak"
    size = 256 * 2**20
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    timings = []
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        target.copy_(source)
        if device == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return 2 * size / min(timings), f"a measured {device} copy"

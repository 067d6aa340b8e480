"""Prefill of a burst of arrivals: one prompt per prefill pass against several together.

When many requests arrive at once, the continuous decoder prefills between decode steps. With
one prompt per pass, the 64th request waits 64 passes for its first token and every running
row waits one pass per joining request. Short prompts now run together, padded, within one
chunk of PREFILL_CHUNK_TOKENS. This script serves a random-weight Qwen2.5-VL on the CPU (4
layers of 768 hidden by default, as `bench/batching.py` builds it) through the engine, sends
waves of N concurrent requests, and compares both ways in interleaved rounds of the same run:
median time to first token, time per output token (prefill interleaving included), and the
wave's wall time.

    uv run python bench/prefill_burst.py                  # about 3 minutes
    uv run python bench/prefill_burst.py --clients 8,32 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def serve(model_dir: Path, max_batch: int) -> Any:
    from hunyuan_service.models.qwen_vl import QwenVLModel
    from hunyuan_service.settings import Settings

    settings = Settings(
        _env_file=None,
        model_type="image2text",
        model_id=str(model_dir),
        device="cpu",
        max_batch_size=max_batch,
        max_queue_size=4 * max_batch,
        warmup=[],
    )
    model = QwenVLModel(settings)
    model.load()
    model.load = lambda: None  # type: ignore[method-assign]  # the engine must keep this one
    return settings, model


def run_waves(args: argparse.Namespace, waves: Any) -> tuple[list[int], dict]:
    """Builds `bench/batching.py`'s model of `args.hidden` x `args.layers`, serves it, and runs
    `waves(settings, model, clients, rounds, tokens)` for `args.clients`; prints the header."""
    from batching import build_model

    clients = [int(n) for n in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        build_model(Path(folder), args.hidden, args.layers)
        settings, model = serve(Path(folder), max(clients))
        results = asyncio.run(waves(settings, model, clients, args.rounds, args.tokens))
    print(f"\n{args.rounds} interleaved rounds; medians; {args.tokens} tokens per request\n")
    return clients, results


async def waves(settings: Any, model: Any, clients: list[int], rounds: int, tokens: int) -> dict:
    from gpu_concurrency import _wave
    from hunyuan_service.engine.engine import Engine
    from hunyuan_service.models.decoding.batch import DecodeBatch

    together = DecodeBatch.fits_together
    ways = {
        "one prompt per pass": lambda self, lengths: len(lengths) == 1,
        "prompts together": together,
    }
    engine = Engine(settings, model)
    await engine.start()
    results: dict[str, dict[int, list[dict[str, float]]]] = {
        way: {n: [] for n in clients} for way in ways
    }
    try:
        await _wave(engine, max(clients), tokens)  # warm-up
        for _ in range(rounds):
            for count in clients:
                for way, fits in ways.items():
                    DecodeBatch.fits_together = fits  # type: ignore[method-assign]
                    results[way][count].append(await _wave(engine, count, tokens))
    finally:
        DecodeBatch.fits_together = together  # type: ignore[method-assign]
        await engine.stop()
        engine.close()
    return results


def wave_arguments(description: str, tokens: int, clients: str) -> argparse.Namespace:
    """The options of the scripts that send waves to a random-weight Qwen through the engine:
    the model's size, the tokens per request, the wave sizes and the rounds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=tokens, help="max_new_tokens per request")
    parser.add_argument("--clients", default=clients)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


def main() -> None:
    args = wave_arguments(__doc__.split("\n\n")[0], tokens=32, clients="8,32,64")
    clients, results = run_waves(args, waves)
    print("| clients | way | TTFT ms | time per token ms | wave s | TTFT ratio | wave ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for count in clients:
        base: dict[str, float] = {}
        for way, by_count in results.items():
            runs = by_count[count]
            row = {k: statistics.median(r[k] for r in runs) for k in ("ttft_s", "tpot_s", "wall_s")}
            base = base or row
            print(
                f"| {count} | {way} | {row['ttft_s'] * 1000:.0f} | {row['tpot_s'] * 1000:.1f} | "
                f"{row['wall_s']:.2f} | {base['ttft_s'] / row['ttft_s']:.2f}x | "
                f"{base['wall_s'] / row['wall_s']:.2f}x |"
            )


if __name__ == "__main__":
    main()

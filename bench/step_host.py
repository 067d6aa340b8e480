"""The host's share of a continuous decode step: each row's own work, per step and per row.

On a GPU the forward pass is queued and the host's work for a step (each row's token taken:
its text streamed, its stop strings and limit checked; each grammar advanced and its mask
computed) either waits for the device or, with DECODE_AHEAD, overlaps it. How much DECODE_AHEAD
can give is bounded by that work's share of a step. This script serves a random-weight
Qwen2.5-VL on the CPU (as `bench/batching.py` builds it) through the engine, with every
request's tokens streamed as events, sends waves of N concurrent requests, and times each step,
the forward pass inside it, and the rows' own work (`Row.take`, `RowSampler.prepare`). The rest
of a step (the logits' cast, the argmax over the vocabulary, the inputs' small tensors) is
device work on a GPU, host work here. Waves with and without DECODE_AHEAD alternate in the same
run.

    uv run python bench/step_host.py                  # about 2 minutes
    uv run python bench/step_host.py --clients 1,32 --rounds 5
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class StepClock:
    """Times the decoder's steps, the forward passes inside them and the rows' own work."""

    def __init__(self, decoder: Any) -> None:
        from hunyuan_service.models.decoding.rows import Row, RowSampler

        self.reset()
        step, forward = decoder.step, decoder._forward
        take, prepare = Row.take, RowSampler.prepare

        def timed(function: Any, total: str) -> Any:
            def run(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    setattr(self, total, getattr(self, total) + time.perf_counter() - started)

            return run

        def counted_step() -> Any:
            self.steps += 1
            self.row_steps += len(decoder.rows)
            return timed(step, "step_s")()

        decoder.step, decoder._forward = counted_step, timed(forward, "forward_s")
        Row.take = timed(take, "rows_s")  # type: ignore[method-assign]
        RowSampler.prepare = timed(prepare, "rows_s")  # type: ignore[method-assign]

    def reset(self) -> None:
        self.step_s = self.forward_s = self.rows_s = 0.0
        self.steps = self.row_steps = 0

    def summary(self) -> dict[str, float]:
        return {
            "step_ms": 1000 * self.step_s / self.steps,
            "forward_ms": 1000 * self.forward_s / self.steps,
            "rows_ms": 1000 * self.rows_s / self.steps,
            "rows_us_per_row": 1e6 * self.rows_s / self.row_steps,
        }


async def waves(settings: Any, model: Any, clients: list[int], rounds: int, tokens: int) -> dict:
    from gpu_concurrency import _wave
    from hunyuan_service.engine.engine import Engine

    clock = StepClock(model.decoder)
    engine = Engine(settings, model)
    await engine.start()
    results: dict[bool, dict[int, list[dict[str, float]]]] = {
        ahead: {n: [] for n in clients} for ahead in (False, True)
    }
    try:
        await _wave(engine, max(clients), tokens)  # warm-up
        for _ in range(rounds):
            for count in clients:
                for ahead in (False, True):
                    model.decoder.ahead = ahead
                    clock.reset()
                    await _wave(engine, count, tokens)
                    results[ahead][count].append(clock.summary())
    finally:
        await engine.stop()
        engine.close()
    return results


def main() -> None:
    from prefill_burst import run_waves, wave_arguments

    args = wave_arguments(__doc__.split("\n\n")[0], tokens=64, clients="1,8,32,64")
    clients, results = run_waves(args, waves)
    print("| clients | DECODE_AHEAD | step ms | forward ms | rows' work ms | per row us |")
    print("| --- | --- | --- | --- | --- | --- |")
    keys = ("step_ms", "forward_ms", "rows_ms", "rows_us_per_row")
    for count in clients:
        for ahead, by_count in results.items():
            row = {k: statistics.median(r[k] for r in by_count[count]) for k in keys}
            print(
                f"| {count} | {'on' if ahead else 'off'} | {row['step_ms']:.3f} | "
                f"{row['forward_ms']:.3f} | {row['rows_ms']:.3f} | {row['rows_us_per_row']:.1f} |"
            )


if __name__ == "__main__":
    main()

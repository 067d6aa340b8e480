"""How long running rows wait while a request with images joins the continuous decoder.

Between two decode steps the continuous decoder runs a joining request's prefill, a chunk of
PREFILL_CHUNK_TOKENS at a time. Its images go through the vision encoder first: whole, until
2026-12-07, so that a request with several large images (or a long video) held every running
row up for its whole encoding; now a block at a time, within about one chunk's worth of work a
turn (models/vision.py). This script serves a random-weight Qwen2.5-VL on the CPU (text: 4
layers of 768 hidden, as `bench/batching.py` builds it; vision: 8 blocks of 384) with the
continuous decoder, hands over 4 text requests and then one request with 4 images of 448x448
(1,024 tokens), and times every decode step. Both ways run in interleaved rounds of the same
run: the longest wait between two steps of the running rows, the joining request's time to its
first token, and the running rows' mean wait between two steps until it joined.

    uv run python bench/vision_join.py                 # about 30 s
    uv run python bench/vision_join.py --rounds 5 --images 8
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WAYS = ("encoder whole", "a block at a time")


def served(chunk: int) -> Any:
    import torch

    from hunyuan_service.models.qwen_vl import QwenVLModel
    from hunyuan_service.models.tiny import QwenVLShape, build_qwen_vl
    from hunyuan_service.settings import Settings

    torch.manual_seed(0)
    vision = {
        "depth": 8,
        "hidden_size": 384,
        "intermediate_size": 1024,
        "num_heads": 6,
        "fullatt_block_indexes": [3, 7],
    }
    shape = QwenVLShape(
        hidden_size=768, layers=4, heads=12, kv_heads=2, intermediate_size=2304, vision=vision
    )
    model, processor = build_qwen_vl(shape)
    model.generation_config.eos_token_id = None  # random weights: every row decodes its length
    settings = Settings(
        _env_file=None,
        model_type="image2text",
        model_id="tiny",
        device="cpu",
        max_batch_size=8,
        prefill_chunk_tokens=chunk,
        vision_cache_bytes=0,  # every round encodes its images
    )
    model_class = QwenVLModel(settings)
    model_class.adopt(model, processor)
    model_class.decoder.eos = frozenset()
    return model_class


def one_round(model: Any, images: list[Any], tokens: int) -> dict[str, float]:
    """The running rows' step times and the joining request's first token, one round."""
    from tests.continuous_feed import ListFeed

    from hunyuan_service.models.base import JobContext
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    decoder = model.decoder
    steps: list[float] = []
    first: list[float] = []
    step = decoder.step

    def timed() -> Any:
        ended = step()
        steps.append(time.perf_counter())
        return ended

    decoder.step = timed
    jobs = [
        (i, Image2TextInput((ChatMessage("user", f"Tell story {i}."),), tokens), JobContext())
        for i in range(4)
    ]
    joining = Image2TextInput((ChatMessage("user", "Compare them.", tuple(images)),), 4)
    mark = JobContext(on_token=lambda _text: first.append(time.perf_counter()))
    jobs.append(("joining", joining, mark))
    feed = ListFeed(jobs)
    begun = time.perf_counter()
    try:
        model.serve_continuously(feed)
    finally:
        decoder.step = step
    assert all(not isinstance(outcome, Exception) for outcome in feed.outcomes.values())
    # The running rows' steps until the first after the joining request's first token: the
    # waits between them span its encoding and prefill.
    during = steps[: bisect.bisect_right(steps, first[0]) + 1]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    return {
        "longest_wait_ms": 1000 * max(gaps),
        "ttft_ms": 1000 * (first[0] - begun),
        "tpot_ms": 1000 * statistics.mean(gaps),
    }


def photos(count: int, width: int, height: int) -> list[Any]:
    """`count` random photos of `width` x `height`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (height, width, 3)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(count)]


def compare(model: Any, images: list[Any], tokens: int, rounds: int) -> dict[str, Any]:
    """Both ways in interleaved rounds after a warm-up: each way's medians (`one_round`'s
    keys), and the ratios of a block at a time to the encoder whole."""
    from hunyuan_service.models.decoding.batch import DecodeBatch

    budget = DecodeBatch.turn_budget
    ways = {"encoder whole": lambda self: None, "a block at a time": budget}
    results: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    one_round(model, images, tokens)  # warm-up
    for _ in range(rounds):
        for way in WAYS:
            DecodeBatch.turn_budget = ways[way]  # type: ignore[method-assign]
            try:
                results[way].append(one_round(model, images, tokens))
            finally:
                DecodeBatch.turn_budget = budget  # type: ignore[method-assign]
    keys = ("longest_wait_ms", "ttft_ms", "tpot_ms")
    medians: dict[str, Any] = {
        way: {k: statistics.median(r[k] for r in results[way]) for k in keys} for way in WAYS
    }
    whole, staged = medians["encoder whole"], medians["a block at a time"]
    medians["wait_ratio"] = staged["longest_wait_ms"] / whole["longest_wait_ms"]
    medians["ttft_ratio"] = staged["ttft_ms"] / whole["ttft_ms"]
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96, help="each running row's tokens")
    parser.add_argument("--chunk", type=int, default=512, help="PREFILL_CHUNK_TOKENS")
    args = parser.parse_args()

    import torch

    medians = compare(served(args.chunk), photos(args.images, 448, 448), args.tokens, args.rounds)
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} "
        f"interleaved rounds, medians; 4 running rows; the joining request: {args.images} "
        f"images of 448x448; PREFILL_CHUNK_TOKENS {args.chunk}\n"
    )
    print(
        "| way | running rows' longest wait, ms | joining request's first token, ms | "
        "running rows' mean wait between steps until it joined, ms |"
    )
    print("| --- | --- | --- | --- |")
    for way in WAYS:
        row = medians[way]
        print(
            f"| {way} | {row['longest_wait_ms']:.0f} | {row['ttft_ms']:.0f} | "
            f"{row['tpot_ms']:.1f} |"
        )
    print(
        f"\na block at a time: longest wait {medians['wait_ratio']:.2f}x, "
        f"first token {medians['ttft_ratio']:.2f}x the encoder whole"
    )


if __name__ == "__main__":
    main()

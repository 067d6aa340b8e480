"""Time to first token for a repeated image, against the first time it is sent (VISION_CACHE_BYTES).

The real `hunyuan-service` command serves the tiny Qwen2.5-VL demo model, once with the vision
cache (the default) and once with VISION_CACHE_BYTES=0, one after the other. Each round sends a
new 1024x1024 photo-sized JPEG with a question, then the same image with another question, and
times the first streamed token of each. The ratio repeat / first is the issue's measure (goal on
the CPU: <= 0.5); the server without the cache is the control, where both should cost the same.

    uv run python bench/vision_cache.py                 # about a minute
    uv run python bench/vision_cache.py --rounds 3 --size 512
"""

import argparse
import asyncio
import base64
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.service_process import ServiceProcess, tiny_env


def photo(size: int, seed: int) -> str:
    """A JPEG data URI of smooth random colour fields, as a photo compresses."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


async def first_token(client: Any, url: str, image: str, question: str) -> float:
    """Seconds from sending the request to its first streamed token."""
    body = {"images": [image], "prompt": question, "max_new_tokens": 4, "stream": True}
    started = time.perf_counter()
    async with client.stream("POST", f"{url}/infer", json=body, timeout=300) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]!r}")
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "token":
                return time.perf_counter() - started
            elif line.startswith("data:") and event == "error":
                raise RuntimeError(line)
    raise RuntimeError("the stream ended without a token")


async def rounds(url: str, count: int, size: int) -> dict[str, float]:
    """TTFT of each new image and of its repeat, medians over `count` rounds."""
    import httpx

    firsts, repeats = [], []
    async with httpx.AsyncClient() as client:
        await first_token(client, url, photo(size, 10_000), "Warm up.")
        for seed in range(count):
            image = photo(size, seed)
            firsts.append(await first_token(client, url, image, "What is in this picture?"))
            repeats.append(await first_token(client, url, image, "What colours are there?"))
    first, repeat = statistics.median(firsts), statistics.median(repeats)
    return {"first_ms": 1000 * first, "repeat_ms": 1000 * repeat, "ratio": repeat / first}


def measure(cache_bytes: int | None, count: int, size: int) -> dict[str, float]:
    """Serves the tiny demo in its own process (the installed command) and runs the rounds."""
    extra = {"MODEL_TYPE": "image2text", "LOG_LEVEL": "warning", "HF_HUB_OFFLINE": "1"}
    if cache_bytes is not None:
        extra["VISION_CACHE_BYTES"] = str(cache_bytes)
    with (
        tempfile.TemporaryDirectory() as cache,
        ServiceProcess(tiny_env(Path(cache), **extra)) as service,
    ):
        return asyncio.run(rounds(service.url, count, size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    print(f"{args.size}x{args.size} JPEG, {args.rounds} rounds, medians; tiny Qwen2.5-VL on CPU")
    print("| server | TTFT first time | TTFT repeated | repeat / first |")
    print("| --- | --- | --- | --- |")
    for name, cache_bytes in (("vision cache on (default)", None), ("VISION_CACHE_BYTES=0", 0)):
        row = measure(cache_bytes, args.rounds, args.size)
        print(
            f"| {name} | {row['first_ms']:.0f} ms | {row['repeat_ms']:.0f} ms "
            f"| {row['ratio']:.3f} |"
        )


if __name__ == "__main__":
    main()

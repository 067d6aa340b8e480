"""Batching: tokens/s, time to first token and latency; one at a time, static and continuous.

It builds a random-weight Qwen2.5-VL large enough that decoding costs real compute on this CPU
(by default 4 layers of 768 hidden; its end-of-text token removed, so every request decodes the
tokens it asks for), serves it over HTTP with MAX_BATCH_SIZE=1, with static batches of 8
(CONTINUOUS_BATCHING=false) and with continuous batching of 8, and measures two workloads:

- closed loop: 1, 4 and 8 streaming clients, every request the same number of greedy tokens;
- staggered: requests arriving as a Poisson process, each asking for between 16 and 512 tokens
  (the same seeded schedule for every server), streamed.

All servers run in the same invocation, so the ratios share one machine state.

    uv run python bench/batching.py                     # about 8 minutes
    uv run python bench/batching.py --workloads staggered --json batching.json
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLIENTS = (1, 4, 8)
# name: (MAX_BATCH_SIZE, CONTINUOUS_BATCHING)
SERVERS = {"batch 1": (1, True), "static 8": (8, False), "continuous 8": (8, True)}


def build_model(folder: Path, hidden: int, layers: int) -> None:
    from hunyuan_service.models.tiny import build_tiny_qwen_vl

    build_tiny_qwen_vl(
        folder, hidden_size=hidden, layers=layers, heads=hidden // 64, intermediate_size=hidden * 3
    )
    # Random weights end at a random end-of-text; without one, a request decodes what it asks.
    config_path = folder / "generation_config.json"
    config = json.loads(config_path.read_text())
    config.pop("eos_token_id", None)
    config_path.write_text(json.dumps(config))


def start_server(
    model_dir: Path, batch: int, continuous: bool, port: int, wait_ms: float | None
) -> subprocess.Popen:
    env = {
        **os.environ,
        "MODEL_TYPE": "image2text",
        "MODEL_ID": str(model_dir),
        "DEVICE": "cpu",
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "MAX_BATCH_SIZE": str(batch),
        "CONTINUOUS_BATCHING": str(continuous).lower(),
        "MAX_NEW_TOKENS_LIMIT": "4096",
        "MAX_QUEUE_SIZE": "64",
        "LOG_LEVEL": "warning",
        "HF_HUB_OFFLINE": "1",
    }
    if wait_ms is not None:
        env["BATCH_WAIT_MS"] = str(wait_ms)
    return subprocess.Popen([sys.executable, "-m", "hunyuan_service"], env=env)


async def wait_ready(url: str, child: subprocess.Popen) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        for _ in range(600):
            if child.poll() is not None:
                raise RuntimeError("server exited during start-up")
            try:
                if (await client.get(f"{url}/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("server did not become ready")


async def one_request(client: Any, url: str, prompt: str, tokens: int) -> dict[str, float]:
    body = {"prompt": prompt, "max_new_tokens": tokens, "stream": True}
    started = time.perf_counter()
    first = None
    result: dict[str, Any] = {}
    async with client.stream("POST", f"{url}/infer", json=body, timeout=600) as response:
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                if event == "token" and first is None:
                    first = time.perf_counter()
                elif event == "result":
                    result = json.loads(line[5:])
                elif event == "error":
                    raise RuntimeError(line)
    ended = time.perf_counter()
    return {
        "latency": ended - started,
        "ttft": (first or ended) - started,
        "tokens": result["usage"]["completion_tokens"],
    }


async def batch_counts(url: str) -> tuple[float, float]:
    """The server's batch-size histogram so far: (jobs, batches)."""
    import httpx

    async with httpx.AsyncClient() as client:
        lines = (await client.get(f"{url}/metrics")).text.splitlines()
    values = {
        line.split()[0]: float(line.split()[-1]) for line in lines if not line.startswith("#")
    }
    return values.get("hunyuan_batch_size_sum", 0.0), values.get("hunyuan_batch_size_count", 0.0)


async def closed_loop(url: str, clients: int, seconds: float, tokens: int) -> dict[str, float]:
    import httpx

    records: list[dict[str, float]] = []
    jobs_before, batches_before = await batch_counts(url)
    stop_at = time.perf_counter() + seconds

    async def client_loop(index: int, client: Any) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            prompt = f"Question {index}-{n}: what does the picture show?"
            records.append(await one_request(client, url, prompt, tokens))
            n += 1

    started = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 2)) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
    wall = time.perf_counter() - started
    latencies = sorted(r["latency"] for r in records)
    jobs_after, batches_after = await batch_counts(url)
    return {
        "mean_batch": (jobs_after - jobs_before) / max(batches_after - batches_before, 1),
        "requests": len(records),
        "tokens_per_s": sum(r["tokens"] for r in records) / wall,
        "ttft_p50_s": statistics.median(r["ttft"] for r in records),
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def poisson_schedule(count: int, rate: float, low: int, high: int, seed: int) -> list:
    """(arrival offset in seconds, max_new_tokens) for `count` requests at `rate` a second."""
    import random

    rng = random.Random(seed)
    offset, schedule = 0.0, []
    for _ in range(count):
        offset += rng.expovariate(rate)
        schedule.append((offset, rng.randint(low, high)))
    return schedule


async def staggered(url: str, schedule: list) -> dict[str, float]:
    """Sends each request at its arrival time, streamed; throughput over the whole run."""
    import httpx

    records: list[dict[str, float]] = []
    limits = httpx.Limits(max_connections=len(schedule) + 2)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()

        async def one(index: int, offset: float, tokens: int) -> None:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            prompt = f"Question {index}: what does the picture show?"
            records.append(await one_request(client, url, prompt, tokens))

        await asyncio.gather(*(one(i, o, t) for i, (o, t) in enumerate(schedule)))
        wall = time.perf_counter() - start
    latencies = sorted(r["latency"] for r in records)
    return {
        "requests": len(records),
        "tokens": sum(r["tokens"] for r in records),
        "tokens_per_s": sum(r["tokens"] for r in records) / wall,
        "ttft_p50_s": statistics.median(r["ttft"] for r in records),
        "ttft_p90_s": sorted(r["ttft"] for r in records)[int(0.9 * len(records))],
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


async def measure(args: argparse.Namespace, model_dir: Path) -> dict[str, dict[Any, Any]]:
    from tests.conftest import free_port

    schedule = poisson_schedule(args.arrivals, args.rate, 16, 512, seed=7)
    results: dict[str, dict[Any, Any]] = {}
    for name, (batch, continuous) in SERVERS.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        child = start_server(model_dir, batch, continuous, port, args.wait_ms)
        results[name] = {}
        try:
            await wait_ready(url, child)
            await closed_loop(url, 2, 3, args.tokens)  # warm-up
            if "closed" in args.workloads:
                for clients in CLIENTS:
                    row = await closed_loop(url, clients, args.seconds, args.tokens)
                    results[name][clients] = row
                    print(f"{name}, closed loop, clients={clients}: {row}", flush=True)
            if "staggered" in args.workloads:
                row = await staggered(url, schedule)
                results[name]["staggered"] = row
                print(f"{name}, staggered: {row}", flush=True)
        finally:
            child.terminate()
            child.wait(timeout=60)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens per request")
    parser.add_argument("--seconds", type=float, default=20, help="per client count")
    parser.add_argument("--wait-ms", type=float, help="BATCH_WAIT_MS (default: the service's)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--workloads", default="closed,staggered")
    parser.add_argument("--arrivals", type=int, default=40, help="staggered: requests")
    parser.add_argument("--rate", type=float, default=2.0, help="staggered: arrivals a second")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "bench-qwen"
        build_model(model_dir, args.hidden, args.layers)
        results = asyncio.run(measure(args, model_dir))
    print(f"\nrandom-weight Qwen2.5-VL, text {args.hidden} hidden x {args.layers} layers, greedy")
    if "closed" in args.workloads:
        print(f"\nclosed loop, {args.tokens} tokens a request, {args.seconds:g} s per row")
        print("| clients | " + " | ".join(f"{n} tok/s, TTFT p50, p99" for n in SERVERS) + " |")
        print("| --- |" + " --- |" * len(SERVERS))
        for clients in CLIENTS:
            cells = [
                f"{r['tokens_per_s']:.1f}, {r['ttft_p50_s']:.3f} s, {r['p99_s']:.2f} s"
                for r in (results[n][clients] for n in SERVERS)
            ]
            print(f"| {clients} | " + " | ".join(cells) + " |")
    if "staggered" in args.workloads:
        print(
            f"\nstaggered: {args.arrivals} Poisson arrivals at {args.rate:g}/s, 16-512 tokens each"
        )
        print("| server | tok/s | TTFT p50 | TTFT p90 | latency p50 | p99 |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name in SERVERS:
            r = results[name]["staggered"]
            print(
                f"| {name} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.3f} s | "
                f"{r['ttft_p90_s']:.3f} s | {r['p50_s']:.2f} s | {r['p99_s']:.2f} s |"
            )
        static, cont = results["static 8"]["staggered"], results["continuous 8"]["staggered"]
        print(
            f"continuous vs static: TTFT p50 {static['ttft_p50_s'] / cont['ttft_p50_s']:.2f}x "
            f"better, tokens/s {cont['tokens_per_s'] / static['tokens_per_s']:.2f}x"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()

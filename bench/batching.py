"""Dynamic batching: tokens/s, time to first token and latency, batching off against on.

It builds a random-weight Qwen2.5-VL large enough that decoding costs real compute on this CPU
(by default 4 layers of 768 hidden), serves it twice over HTTP, with MAX_BATCH_SIZE=1 and with
MAX_BATCH_SIZE=8, and runs 1, 4 and 8 closed-loop streaming clients against each. Every request
asks for the same number of greedy tokens. Both servers run in the same invocation, so the ratios
share one machine state.

    uv run python bench/batching.py                     # about 4 minutes
    uv run python bench/batching.py --seconds 10 --json batching.json
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


def build_model(folder: Path, hidden: int, layers: int) -> None:
    from hunyuan_service.models.tiny import build_tiny_qwen_vl

    build_tiny_qwen_vl(
        folder, hidden_size=hidden, layers=layers, heads=hidden // 64, intermediate_size=hidden * 3
    )


def start_server(model_dir: Path, batch: int, port: int, wait_ms: float | None) -> subprocess.Popen:
    env = {
        **os.environ,
        "MODEL_TYPE": "image2text",
        "MODEL_ID": str(model_dir),
        "DEVICE": "cpu",
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "MAX_BATCH_SIZE": str(batch),
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


async def measure(args: argparse.Namespace, model_dir: Path) -> dict[str, dict[int, Any]]:
    from tests.conftest import free_port

    results: dict[str, dict[int, Any]] = {}
    for batch in (1, 8):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        child = start_server(model_dir, batch, port, args.wait_ms)
        try:
            await wait_ready(url, child)
            await closed_loop(url, 2, 3, args.tokens)  # warm-up
            results[f"batch {batch}"] = {}
            for clients in CLIENTS:
                row = await closed_loop(url, clients, args.seconds, args.tokens)
                results[f"batch {batch}"][clients] = row
                print(f"MAX_BATCH_SIZE={batch} clients={clients}: {row}", flush=True)
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "bench-qwen"
        build_model(model_dir, args.hidden, args.layers)
        results = asyncio.run(measure(args, model_dir))
    off, on = results["batch 1"], results["batch 8"]
    print(
        f"\nrandom-weight Qwen2.5-VL, text {args.hidden} hidden x {args.layers} layers, "
        f"{args.tokens} greedy tokens a request, {args.seconds:g} s per row"
    )
    print(
        f"{'clients':>7s} {'tok/s off':>10s} {'tok/s on':>9s} {'x':>6s} {'TTFT off':>9s} "
        f"{'TTFT on':>8s} {'p50 off':>8s} {'p50 on':>7s} {'p99 off':>8s} {'p99 on':>7s} "
        f"{'p99 x':>6s} {'batch':>6s}"
    )
    for clients in CLIENTS:
        a, b = off[clients], on[clients]
        print(
            f"{clients:7d} {a['tokens_per_s']:10.1f} {b['tokens_per_s']:9.1f} "
            f"{b['tokens_per_s'] / a['tokens_per_s']:6.2f} {a['ttft_p50_s']:9.3f} "
            f"{b['ttft_p50_s']:8.3f} {a['p50_s']:8.3f} {b['p50_s']:7.3f} {a['p99_s']:8.3f} "
            f"{b['p99_s']:7.3f} {b['p99_s'] / a['p99_s']:6.2f} {b['mean_batch']:6.2f}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()

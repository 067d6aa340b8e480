"""Per-request overhead: this service against a bare FastAPI endpoint, measured in one run.

Three servers answer `POST /infer` with the same ~16 KB JSON body, each in its own process
pinned to core 0, while wrk loads it from core 1:

- bare: a FastAPI handler that returns the body directly (the ceiling);
- reference: the reference design (Queue(maxsize=1) + to_thread + Future) with an instant model;
- service: this service (image2text route, queue, worker, Future) with an instant model, served
  as the `hunyuan-service` command serves it (its header-deadline protocol, LIMIT_CONCURRENCY).

Each row gives requests per second against bare, latency percentiles, and the server's own CPU
time per request (all its threads, read from /proc around each round), which is steadier than
throughput on a shared VM, with its lowest and highest round: differences inside that spread
are noise.

    apt-get install wrk   # once
    uv run python bench/overhead.py                    # about 1.5 minutes
    uv run python bench/overhead.py --connections 32 --seconds 5 --rounds 5
    uv run python bench/overhead.py --configs reference,service --rounds 10 --seconds 4
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXT = "x" * 16_000
CONFIGS = ("bare", "reference", "service")


def instant_model() -> Any:
    from hunyuan_service.models.base import InferenceModel, JobContext
    from hunyuan_service.models.types import Image2TextOutput
    from hunyuan_service.settings import Settings

    class InstantModel(InferenceModel[Any, Any]):
        model_type = "image2text"

        def __init__(self) -> None:
            super().__init__(
                Settings(
                    _env_file=None,
                    model_type="image2text",
                    model_id="bench/instant",
                    max_queue_size=64,
                )
            )

        def load(self) -> None:
            self.info.device, self.info.dtype = "cpu", "none"

        def infer(self, request: Any, ctx: JobContext) -> Any:
            return Image2TextOutput(
                text=TEXT, prompt_tokens=1, completion_tokens=1, finish_reason="stop"
            )

    return InstantModel()


def serve(config: str, port: int, prepare: Any = None) -> None:
    """Serves `config`'s app on `port` with uvicorn; `prepare(app)`, if given, runs first."""
    import logging

    import uvicorn

    logging.disable(logging.WARNING)
    app, extra = build_app(config)
    if prepare is not None:
        prepare(app)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False, **extra)


def build_app(config: str) -> tuple[Any, dict[str, Any]]:
    """`config`'s app and the uvicorn options it is served with."""
    from fastapi import FastAPI

    if config == "bare":
        app = FastAPI()

        @app.post("/infer")
        async def infer() -> dict:
            return {"text": TEXT}

        return app, {}
    if config == "reference":
        from bench.overload import reference_app

        class Echo:
            def infer(self, _prompt: Any, _ctx: Any) -> str:
                return TEXT

        return reference_app(Echo(), field="text"), {}
    from hunyuan_service.api.app import create_app

    model = instant_model()
    app = create_app(model.settings, model=model)
    guard = app.state.header_guard  # served as `hunyuan-service` serves it (__main__.py)
    return app, {
        "limit_concurrency": model.settings.limit_concurrency,
        "http": guard.protocol_class() if guard.enabled else "h11",
    }


def run_wrk(url: str, connections: int, seconds: float) -> dict[str, float]:
    script = 'wrk.method = "POST"\nwrk.body = \'{"prompt": "hi"}\'\n'
    script += 'wrk.headers["Content-Type"] = "application/json"\n'
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    command = [
        "taskset",
        "-c",
        "1",
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        "-s",
        handle.name,
        f"{url}/infer",
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    os.unlink(handle.name)

    def millis(label: str) -> float:
        match = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", output)
        if match is None:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        "p50_ms": millis("50%"),
        "p99_ms": millis("99%"),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def start(config: str) -> tuple[subprocess.Popen, str]:
    import httpx
    from tests.conftest import free_port

    port = free_port()
    child = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, __file__, "--serve", config, "--port", str(port)]
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.post(f"{url}/infer", json={"prompt": "hi"}, timeout=2).status_code == 200:
                return child, url
        except httpx.TransportError:
            pass
        if time.time() > deadline or child.poll() is not None:
            raise RuntimeError(f"{config} server did not start")
        time.sleep(0.2)


def measure_all(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Starts every server, then interleaves rounds so that slow drifts hit all of them alike."""
    servers = {config: start(config) for config in args.configs}
    rounds: dict[str, list[dict[str, float]]] = {config: [] for config in args.configs}
    try:
        for _, url in servers.values():
            run_wrk(url, args.connections, 2)  # warm-up
        for _ in range(args.rounds):
            for config, (child, url) in servers.items():
                before = cpu_seconds(child.pid)
                result = run_wrk(url, args.connections, args.seconds)
                served = result["requests_per_s"] * args.seconds
                result["cpu_us"] = 1e6 * (cpu_seconds(child.pid) - before) / max(served, 1)
                rounds[config].append(result)
    finally:
        for child, _ in servers.values():
            child.terminate()
            child.wait(timeout=30)
    results = {
        config: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for config, runs in rounds.items()
    }
    for config, runs in rounds.items():  # how far the rounds spread: the noise to read against
        results[config]["cpu_us_min"] = min(r["cpu_us"] for r in runs)
        results[config]["cpu_us_max"] = max(r["cpu_us"] for r in runs)
    return results


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) a process has used, from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=CONFIGS)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs; medians shown")
    parser.add_argument(
        "--configs",
        type=lambda text: [name for name in text.split(",") if name],
        default=list(CONFIGS),
        help="comma-separated servers to compare (default: all); without bare, no x bare column",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if unknown := set(args.configs) - set(CONFIGS):
        parser.error(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    if args.serve:
        serve(args.serve, args.port)
        return
    results = measure_all(args)
    bare = results.get("bare")
    print(
        f"wrk: {args.connections} connections, {args.rounds} interleaved rounds of "
        f"{args.seconds:g} s (medians); servers on core 0, wrk on core 1; ~16 KB JSON bodies"
    )
    print(
        f"{'server':10s} {'req/s':>9s} {'x bare':>7s} {'p50 ms':>8s} {'p99 ms':>8s} "
        f"{'p99 x bare':>10s} {'non-2xx':>8s} {'CPU us/req':>10s} {'(rounds)':>10s}"
    )
    for config, row in results.items():
        throughput = f"{row['requests_per_s'] / bare['requests_per_s']:7.2f}" if bare else "      -"
        tail = f"{row['p99_ms'] / bare['p99_ms']:10.2f}" if bare else "         -"
        print(
            f"{config:10s} {row['requests_per_s']:9.0f} {throughput} {row['p50_ms']:8.2f} "
            f"{row['p99_ms']:8.2f} {tail} {row['non_2xx']:8.0f} {row['cpu_us']:10.0f} "
            f"{row['cpu_us_min']:5.0f}-{row['cpu_us_max']:<4.0f}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()

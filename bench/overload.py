"""Reproduces the abandoned-client burst against this service and a reference-design baseline.

Each configuration runs in its own server process on a step-based model: N steps of S ms, which
honour cancellation between steps the way the FLUX step callback does. The load is then:

1. burst: 200 clients at once, each giving up after 2 s;
2. fresh: one new request right after the burst, timed;
3. saturation: 4 closed-loop clients for a few seconds, to measure the model's duty cycle.

The baseline is the reference design (asyncio.Queue(maxsize=1) + to_thread + Future, no
cancellation), written here only as a yardstick. Ratios are printed against it.

    uv run python bench/overload.py            # all configurations, about a minute
    uv run python bench/overload.py --steps 10 --step-ms 10 --clients 200 --client-timeout 2
"""

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from typing import Any

CONFIGS = {
    "reference": "reference design: Queue(maxsize=1), blocking put, no cancellation",
    "service": "hunyuan-service, default MAX_QUEUE_SIZE=8",
    "service-deep": "hunyuan-service, MAX_QUEUE_SIZE=256 (everyone queues; leavers withdrawn)",
}


# -- the server side (runs in a child process) -------------------------------------------------


def build_model(steps: int, step_s: float) -> Any:
    from PIL import Image

    from hunyuan_service.models.base import InferenceModel, JobContext
    from hunyuan_service.models.types import Text2ImageOutput
    from hunyuan_service.settings import Settings

    class StepModel(InferenceModel[Any, Any]):
        """Sleeps per step and checks for cancellation between steps; logs every job."""

        model_type = "text2image"

        def __init__(self) -> None:
            super().__init__(Settings(_env_file=None, model_id="bench/step-model"))
            self.jobs: list[dict[str, Any]] = []
            self.image = Image.new("RGB", (16, 16))

        def load(self) -> None:
            self.info.device, self.info.dtype = "cpu", "none"

        def infer(self, request: Any, ctx: JobContext) -> Any:
            prompt = request if isinstance(request, str) else request.prompt
            record = {"prompt": prompt, "start": time.time(), "finished": False}
            self.jobs.append(record)
            try:
                for _ in range(steps):
                    time.sleep(step_s)
                    ctx.raise_if_stopped()
                record["finished"] = True
            finally:
                record["end"] = time.time()
            return Text2ImageOutput(images=(self.image,), seed=0, num_inference_steps=steps)

    return StepModel()


def reference_app(model: Any, field: str = "image_base64") -> Any:
    """The reference design; its answer puts the model's result (a string) under `field`."""
    from fastapi import FastAPI, Request

    from hunyuan_service.models.base import JobContext

    queue: asyncio.Queue = asyncio.Queue(maxsize=1)

    async def worker() -> None:
        while True:
            prompt, future = await queue.get()
            result = await asyncio.to_thread(model.infer, prompt, JobContext())
            # The reference set the result unconditionally, which killed its worker once a
            # client had left; guarding it here keeps the baseline alive long enough to measure.
            if not future.done():
                future.set_result(result)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        task = asyncio.create_task(worker())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.post("/infer")
    async def infer(request: Request) -> dict:
        body = await request.json()
        future = asyncio.get_running_loop().create_future()
        await queue.put((body["prompt"], future))
        result = await future
        return {field: result if isinstance(result, str) else ""}

    return app


def serve(config: str, port: int, steps: int, step_s: float) -> None:
    import uvicorn

    from hunyuan_service.api.app import create_app
    from hunyuan_service.settings import Settings

    model = build_model(steps, step_s)
    if config == "reference":
        app = reference_app(model)
    else:
        queue = 256 if config == "service-deep" else 8
        settings = Settings(_env_file=None, model_id="bench/step-model", max_queue_size=queue)
        app = create_app(settings, model=model)

    @app.get("/_bench/jobs")
    async def jobs() -> list:
        return model.jobs

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error")


# -- the client side ---------------------------------------------------------------------------


async def one_request(client: Any, url: str, prompt: str, timeout: float) -> dict[str, Any]:
    import httpx

    start = time.time()
    body = {"prompt": prompt, "width": 64, "height": 64}
    try:
        response = await client.post(f"{url}/infer", json=body, timeout=timeout)
        outcome = "ok" if response.status_code == 200 else str(response.status_code)
    except httpx.TimeoutException:
        outcome = "gave_up"
    return {"prompt": prompt, "start": start, "end": time.time(), "outcome": outcome}


async def drive(url: str, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=args.clients + 16, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits) as client:
        burst = await asyncio.gather(
            *(
                one_request(client, url, f"burst-{i}", args.client_timeout)
                for i in range(args.clients)
            )
        )
        fresh = await one_request(client, url, "fresh", 120)
        stop_at = time.time() + args.saturation_s

        async def closed_loop(n: int) -> None:
            i = 0
            while time.time() < stop_at:
                await one_request(client, url, f"sat-{n}-{i}", 120)
                i += 1

        sat_start = time.time()
        await asyncio.gather(*(closed_loop(n) for n in range(4)))
        sat_end = time.time()
        jobs = (await client.get(f"{url}/_bench/jobs")).json()
    return {"burst": burst, "fresh": fresh, "jobs": jobs, "sat": (sat_start, sat_end)}


def summarise(data: dict[str, Any], job_s: float) -> dict[str, float]:
    left = {r["prompt"]: r["end"] for r in data["burst"] if r["outcome"] == "gave_up"}
    burst_jobs = [j for j in data["jobs"] if j["prompt"].startswith("burst-")]
    # A job "ran after its client left" if it was started after the client gave up.
    after_left = [j for j in burst_jobs if j["prompt"] in left and j["start"] > left[j["prompt"]]]
    wasted = sum(
        j["end"] - max(j["start"], left[j["prompt"]])
        for j in burst_jobs
        if j["prompt"] in left and j["end"] > left[j["prompt"]]
    )
    model_time = sum(j["end"] - j["start"] for j in burst_jobs) or 1e-9
    sat_jobs = sorted(
        (j for j in data["jobs"] if j["prompt"].startswith("sat-")), key=lambda j: j["start"]
    )
    busy = sum(j["end"] - j["start"] for j in sat_jobs)
    gaps = sorted(b["start"] - a["end"] for a, b in itertools.pairwise(sat_jobs))
    span = sat_jobs[-1]["end"] - sat_jobs[0]["start"] if sat_jobs else 1e-9
    outcomes: dict[str, int] = {}
    for r in data["burst"]:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    fresh = data["fresh"]
    return {
        "burst_ok": outcomes.get("ok", 0),
        "burst_503": outcomes.get("503", 0),
        "burst_gave_up": outcomes.get("gave_up", 0),
        "jobs_started_after_client_left": len(after_left),
        "wasted_model_time_share": wasted / model_time,
        "fresh_wait_s": fresh["end"] - fresh["start"],
        "fresh_wait_in_jobs": (fresh["end"] - fresh["start"]) / job_s,
        "fresh_ok": float(fresh["outcome"] == "ok"),
        "duty_cycle": busy / span,
        "saturation_jobs": len(sat_jobs),
        "gap_between_jobs_ms_p50": 1000 * gaps[len(gaps) // 2] if gaps else 0.0,
        "gap_between_jobs_ms_max": 1000 * gaps[-1] if gaps else 0.0,
        "burst_other_status": sum(
            v for k, v in outcomes.items() if k not in ("ok", "503", "gave_up")
        ),
    }


def run_config(config: str, args: argparse.Namespace) -> dict[str, float]:
    import httpx

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.conftest import free_port

    port = free_port()
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            config,
            "--port",
            str(port),
            "--steps",
            str(args.steps),
            "--step-ms",
            str(args.step_ms),
        ],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                httpx.get(f"{url}/_bench/jobs", timeout=1)
                break
            except httpx.TransportError:
                if time.time() > deadline or child.poll() is not None:
                    raise RuntimeError(f"{config} server did not start") from None
                time.sleep(0.2)
        data = asyncio.run(drive(url, args))
    finally:
        child.terminate()
        child.wait(timeout=30)
    return summarise(data, args.steps * args.step_ms / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=list(CONFIGS))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-ms", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--client-timeout", type=float, default=2.0)
    parser.add_argument("--saturation-s", type=float, default=5.0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.steps, args.step_ms / 1000)
        return

    job_ms = args.steps * args.step_ms
    print(
        f"job: {args.steps} steps x {args.step_ms:g} ms = {job_ms:g} ms; burst: "
        f"{args.clients} clients giving up after {args.client_timeout:g} s"
    )
    results = {}
    for config, description in CONFIGS.items():
        print(f"\n== {config}: {description}", flush=True)
        results[config] = run_config(config, args)
        for key, value in results[config].items():
            print(f"  {key:32s} {value:10.3f}")
    base = results["reference"]
    print("\n== ratios against the reference design (lower is better except duty cycle)")
    for config in ("service", "service-deep"):
        row = results[config]
        waste = row["wasted_model_time_share"] / max(base["wasted_model_time_share"], 1e-9)
        wait = row["fresh_wait_s"] / base["fresh_wait_s"]
        duty = row["duty_cycle"] / base["duty_cycle"]
        print(
            f"  {config:14s} wasted model time x{waste:.3f}   fresh wait x{wait:.3f}   "
            f"duty cycle x{duty:.3f}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()

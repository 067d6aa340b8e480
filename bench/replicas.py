"""Several replicas behind nginx: scale-out, a replica killed, a replica drained.

A Kubernetes cluster can't run here, so this simulates its data path on loopback: three
`hunyuan-service` processes (the real service, with a fake text2image model whose every job takes
a fixed time) behind nginx configured exactly as deploy/nginx/hunyuan.conf (a 503 is retried on
the next replica). It measures, in one run:

1. Scale-out: closed-loop clients on one replica directly (as many as it admits: 1 running +
   MAX_QUEUE_SIZE waiting), then three times as many through nginx to three replicas.
   Throughput ratio, goal >= 2.5x.
2. Failure and drain under a burst of 10x one replica's capacity through nginx: one replica is
   SIGKILLed a third of the way in, another SIGTERMed (drained) half way. Every request must end
   as a 200 or a 503 with Retry-After at the edge; only jobs on the killed replica may fail
   (counted); the drained replica must finish every job it admitted and exit 0.

Needs nginx (Debian's nginx-light; installed with apt-get when missing and run as root).

    uv run python bench/replicas.py              # about 40 s
    uv run python bench/replicas.py --quick      # about 20 s; tests/e2e/test_replicas.py
"""

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
QUEUE = 4  # MAX_QUEUE_SIZE of each replica: it admits 1 running + 4 waiting


# -- one replica: the real service with a fixed-time fake model --------------------------------


def run_replica(job_s: float) -> int:
    """Runs `hunyuan-service` (its own `serve`, signals and drain) with a fake model."""
    from hunyuan_service import __main__ as service
    from hunyuan_service.models import registry
    from hunyuan_service.models.base import InferenceModel, JobContext

    class FixedTimeModel(InferenceModel[Any, Any]):
        model_type = "text2image"

        def load(self) -> None:
            self.info.device, self.info.dtype = "cpu", "none"

        def infer(self, request: Any, ctx: JobContext) -> Any:
            from PIL import Image

            from hunyuan_service.models.types import Text2ImageOutput

            for step in range(10):
                time.sleep(job_s / 10)
                ctx.on_progress(step + 1, 10)
                ctx.raise_if_stopped()
            image = Image.new("RGB", (request.width, request.height), (40, 80, 120))
            return Text2ImageOutput(images=(image,), seed=0, num_inference_steps=10)

    registry.get_model = lambda settings: FixedTimeModel(settings)  # type: ignore[assignment]
    return service.serve()


class Replica:
    def __init__(self, port: int, job_s: float, logs: Path) -> None:
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.log = logs / f"replica-{port}.log"
        env = {
            **os.environ,
            "MODEL_TYPE": "text2image",
            "MODEL_ID": "fake/fixed-time",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "MAX_QUEUE_SIZE": str(QUEUE),
            "SHUTDOWN_TIMEOUT_S": "60",
            "LOG_LEVEL": "info",
            "PLAYGROUND": "false",
        }
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--replica", str(job_s)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def final_counters(self) -> dict[str, int]:
        """The job counters of the service's last log line ("stopped admitted=... ...")."""
        for line in reversed(self.log.read_text().splitlines()):
            if ": stopped" in line:
                return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
        return {}


async def wait_ready(urls: list[str], timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        for url in urls:
            while True:
                try:
                    if (await client.get(f"{url}/ready", timeout=2)).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} not ready")
                await asyncio.sleep(0.1)


# -- nginx, configured by deploy/nginx/hunyuan.conf ---------------------------------------------


def start_nginx(edge: int, ports: list[int], work: Path) -> subprocess.Popen:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise SystemExit("bench/replicas.py needs nginx (apt-get install nginx-light)")
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx-light"],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            stdout=subprocess.DEVNULL,
        )
    site = (ROOT / "deploy" / "nginx" / "hunyuan.conf").read_text()
    servers = "".join(f"    server 127.0.0.1:{p} max_fails=0;\n" for p in ports)
    site = re.sub(r"(    server 127\.0\.0\.1:\d+ max_fails=0;\n)+", servers, site)
    site = site.replace("listen 8000;", f"listen 127.0.0.1:{edge};")
    (work / "hunyuan.conf").write_text(site)
    temp = "".join(
        f"{kind}_temp_path {work}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi")
    )
    temp += f"uwsgi_temp_path {work}/uwsgi;\nscgi_temp_path {work}/scgi;\n"
    (work / "nginx.conf").write_text(
        f"worker_processes 1;\ndaemon off;\npid {work}/nginx.pid;\nerror_log {work}/error.log;\n"
        "events { worker_connections 2048; }\n"
        f"http {{\naccess_log off;\n{temp}include {work}/hunyuan.conf;\n}}\n"
    )
    return subprocess.Popen([nginx, "-p", str(work), "-c", str(work / "nginx.conf")])


# -- closed-loop clients ---------------------------------------------------------------------


async def load(url: str, clients: int, seconds: float, events: list | None = None) -> dict:
    """`clients` loops posting small text2image requests for `seconds`; counts the outcomes.

    A 503 is answered by a short pause and a retry (a real client would honour Retry-After; a
    benchmark wants the pressure). `events`, if given, are (at_s, action) run along the way.
    """
    import httpx

    outcomes: dict[str, int] = {}
    body = {"prompt": "a fox", "width": 64, "height": 64}
    started = time.monotonic()
    stop_at = started + seconds

    def count(key: str) -> None:
        outcomes[key] = outcomes.get(key, 0) + 1

    async def one(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            try:
                reply = await client.post(f"{url}/infer", json=body, timeout=120)
            except httpx.HTTPError as error:
                count(f"client error: {type(error).__name__}")
                continue
            if reply.status_code == 200:
                count("200")
            elif reply.status_code == 503:
                if not reply.headers.get("retry-after"):
                    count("503 without Retry-After")
                elif b'"no_replica"' in reply.content:
                    count("503 with Retry-After, from nginx: no replica reachable")
                else:
                    count("503 with Retry-After")
                await asyncio.sleep(0.05)
            else:
                count(str(reply.status_code))

    async def timeline() -> None:
        for at_s, action in events or []:
            await asyncio.sleep(max(0.0, started + at_s - time.monotonic()))
            action()

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as client:
        await asyncio.gather(timeline(), *(one(client) for _ in range(clients)))
    outcomes["seconds"] = round(time.monotonic() - started, 2)  # type: ignore[assignment]
    return outcomes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    ports = [free_port() for _ in range(3)]
    edge = free_port()
    replicas = [Replica(port, args.job_s, work) for port in ports]
    nginx = start_nginx(edge, ports, work)
    edge_url = f"http://127.0.0.1:{edge}"
    capacity = 1 + QUEUE
    try:
        await wait_ready([r.url for r in replicas])
        await wait_ready([edge_url])
        one = await load(replicas[0].url, capacity, args.seconds)
        three = await load(edge_url, 3 * capacity, args.seconds)
        rate_one = one.get("200", 0) / one["seconds"]
        rate_three = three.get("200", 0) / three["seconds"]
        killed, drained = replicas[0], replicas[1]
        burst_s = args.burst_seconds
        events = [
            (burst_s / 3, lambda: killed.proc.send_signal(signal.SIGKILL)),
            (burst_s / 2, lambda: drained.proc.send_signal(signal.SIGTERM)),
        ]
        burst = await load(edge_url, 10 * capacity, burst_s, events)
        drained_exit = drained.proc.wait(timeout=120)
        counters = drained.final_counters()
        # Requests cut off on the killed replica, as nginx logged them: each was resent to
        # another replica (non_idempotent) or answered 503 at the edge.
        log = (work / "error.log").read_text() if (work / "error.log").exists() else ""
        cut_off = sum(
            1
            for line in log.splitlines()
            if f":{killed.port}/" in line
            and ("prematurely closed" in line or "reset by peer" in line)
        )
    finally:
        nginx.send_signal(signal.SIGQUIT)
        for replica in replicas:
            if replica.proc.poll() is None:
                replica.proc.send_signal(signal.SIGTERM)
        for proc in [nginx, *(r.proc for r in replicas)]:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    clean = {
        "200",
        "503 with Retry-After",
        "503 with Retry-After, from nginx: no replica reachable",
        "seconds",
    }
    failed = sum(v for k, v in burst.items() if k not in clean)
    return {
        "job_s": args.job_s,
        "replica_capacity": capacity,
        "one_replica": {**one, "per_s": round(rate_one, 2)},
        "three_replicas_via_nginx": {**three, "per_s": round(rate_three, 2)},
        "scale_out_ratio": round(rate_three / rate_one, 3) if rate_one else 0.0,
        "burst": burst,
        "burst_failed": failed,
        "burst_cut_off_on_the_killed_replica": cut_off,
        "drained_exit_code": drained_exit,
        "drained_counters": counters,
    }


def verdicts(result: dict[str, Any]) -> list[tuple[str, bool]]:
    counters = result["drained_counters"]
    finished = counters.get("completed", 0) + counters.get("failed", 0)
    return [
        ("three replicas >= 2.5x one", result["scale_out_ratio"] >= 2.5),
        (
            "every burst request: 200, or 503 with Retry-After, but for jobs of the killed replica",
            result["burst_failed"] <= result["replica_capacity"],
        ),
        ("the drained replica exited 0", result["drained_exit_code"] == 0),
        (
            "the drained replica finished every job it admitted",
            bool(counters) and counters.get("admitted", -1) == counters.get("completed", -2),
        ),
        ("...and failed none", counters.get("failed", 0) == 0 and finished > 0),
    ]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--replica":
        sys.exit(run_replica(float(sys.argv[2])))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases, for the test")
    parser.add_argument("--job-s", type=float, default=0.2, help="each fake job's run time")
    parser.add_argument("--seconds", type=float, default=8.0, help="each throughput phase")
    parser.add_argument("--burst-seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.burst_seconds = 3.0, 4.0
    with tempfile.TemporaryDirectory(prefix="replicas-") as folder:
        result = asyncio.run(measure(args, Path(folder)))
    checks = verdicts(result)
    result["checks"] = dict(checks)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    for name, ok in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    sys.exit(0 if all(ok for _, ok in checks) else 1)


if __name__ == "__main__":
    main()

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

With `--jobs N`, instead: the jobs API on one shared Redis store (JOB_STORE_URL, a real
redis-server with a password). One replica alone runs N/5 jobs (the baseline rate); then three
replicas behind nginx get N jobs posted through nginx and polled through random replicas, and one
replica is SIGKILLed while it runs a job, a third of the way in. It checks: no job lost or
answered `job_not_found`; the killed replica's running job ends `replica_lost` within the lease
bound (4 heartbeats); what it had only claimed runs elsewhere; every other job succeeds; jobs
start in submission order within the number of replicas; the password is in no log. It reports
both rates and the Redis commands and bytes per job.

Needs nginx (Debian's nginx-light; installed with apt-get when missing and run as root).

    uv run python bench/replicas.py              # about 40 s
    uv run python bench/replicas.py --quick      # about 20 s; tests/e2e/test_replicas.py
    uv run python bench/replicas.py --jobs 300 --job-s 0.1   # about 40 s
    uv run python bench/replicas.py --jobs 45 --job-s 0.05   # tests/e2e/test_shared_jobs.py
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
    def __init__(
        self, port: int, job_s: float, logs: Path, extra_env: dict[str, str] | None = None
    ) -> None:
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
            **(extra_env or {}),
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


# -- the jobs workload: three replicas on one Redis job store -----------------------------------

REDIS_PASSWORD = "bench-" + "pw" * 8  # must never appear in a replica's log
HEARTBEAT_S = 0.5


def start_redis(port: int, work: Path) -> subprocess.Popen:
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(server).exists():
        raise SystemExit(
            "bench/replicas.py --jobs needs redis-server (apt-get install redis-server)"
        )
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    args += ["no", "--dir", str(work), "--requirepass", REDIS_PASSWORD]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def measure_jobs(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Jobs through nginx to three replicas on one store; one SIGKILLed mid-burst."""
    import random

    import httpx
    import redis.asyncio

    redis_port, edge = free_port(), free_port()
    store_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_port}/0"
    env = {
        "JOB_STORE_URL": store_url,
        "JOB_STORE_HEARTBEAT_S": str(HEARTBEAT_S),
        "MAX_QUEUE_SIZE": str(args.jobs + 10),
        "MAX_STORED_JOBS": str(2 * args.jobs + 100),
    }
    server = start_redis(redis_port, work)
    store = redis.asyncio.from_url(store_url)
    ports = [free_port() for _ in range(3)]
    replicas: list[Replica] = []
    nginx = None
    body = {"prompt": "a fox", "width": 64, "height": 64}
    try:
        for _ in range(100):
            try:
                await store.ping()
                break
            except redis.ConnectionError:
                await asyncio.sleep(0.1)
        replicas.append(Replica(ports[0], args.job_s, work, env))
        await wait_ready([replicas[0].url])
        async with httpx.AsyncClient(timeout=60) as client:
            # One replica alone: the baseline rate.
            alone = args.jobs // 5
            started = time.monotonic()
            solo = [
                (await client.post(f"{replicas[0].url}/v1/jobs", json=body)).json()["id"]
                for _ in range(alone)
            ]
            await settle(client, [replicas[0].url], solo, {})
            rate_one = alone / (time.monotonic() - started)

            replicas += [Replica(port, args.job_s, work, env) for port in ports[1:]]
            nginx = start_nginx(edge, ports, work)
            edge_url = f"http://127.0.0.1:{edge}"
            await wait_ready([r.url for r in replicas] + [edge_url])
            victim = replicas[0]
            victim_id = (await client.get(f"{victim.url}/health")).json()["job_store"]["replica"]
            before = await redis_counts(store)
            started = time.monotonic()
            ids: list[str] = []
            killed_at = None
            for index in range(args.jobs):
                reply = await client.post(f"{edge_url}/v1/jobs", json=body)
                assert reply.status_code == 202, reply.text
                ids.append(reply.json()["id"])
                if killed_at is None and index >= args.jobs // 3:
                    # Frozen while its running jobs are read, so that it cannot finish one and
                    # start another between the read and the kill (jobs take 50 ms here).
                    frozen(victim.proc)
                    running = await running_on(store, ids, victim_id)
                    if running:
                        victim.proc.send_signal(signal.SIGKILL)
                        killed_at = time.time()
                        lost_ids = running
                    else:
                        victim.proc.send_signal(signal.SIGCONT)
            live = [r.url for r in replicas[1:]]
            misses: dict[str, int] = {}
            finals = await settle(client, live, ids, misses, random.Random(0))
            elapsed = time.monotonic() - started
            after = await redis_counts(store)
        stamps = await job_stamps(store, ids)
    finally:
        if nginx is not None:
            nginx.send_signal(signal.SIGQUIT)
        for replica in replicas:
            if replica.proc.poll() is None:
                replica.proc.send_signal(signal.SIGTERM)
        for proc in [*(r.proc for r in replicas), *([nginx] if nginx else [])]:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        await store.aclose()
        server.terminate()
        server.wait(timeout=30)
    lost = [job_id for job_id, final in finals.items() if final[1] == "replica_lost"]
    lost_after_s = [round(stamps[job_id][1] - killed_at, 2) for job_id in lost if killed_at]
    succeeded = sum(final[0] == "succeeded" for final in finals.values())
    # A job the killed replica had claimed but not started goes back to the head of the queue
    # when its lease lapses: it starts late by design, and is left out of the order check.
    requeued = [job_id for job_id, stamp in stamps.items() if stamp[2]]
    considered = [j for j in ids if stamps[j][0] and not stamps[j][2]]
    start_rank = {j: rank for rank, j in enumerate(sorted(considered, key=lambda j: stamps[j][0]))}
    displacement = max((abs(start_rank[j] - i) for i, j in enumerate(considered)), default=0)
    commands = after["commands"] - before["commands"]
    moved = after["bytes"] - before["bytes"]
    logs = "".join(r.log.read_text() for r in replicas)
    return {
        "jobs": args.jobs,
        "job_s": args.job_s,
        "heartbeat_s": HEARTBEAT_S,
        "one_replica_jobs_per_s": round(rate_one, 2),
        "three_replicas_jobs_per_s": round(args.jobs / elapsed, 2),
        "killed_replica_running": len(lost_ids) if killed_at else 0,
        "finals": {
            status: sum(final[0] == status for final in finals.values())
            for status in {final[0] for final in finals.values()}
        },
        "succeeded": succeeded,
        "replica_lost": lost,
        "replica_lost_after_kill_s": lost_after_s,
        "lease_bound_s": 4 * HEARTBEAT_S,
        "job_not_found": misses.get("job_not_found", 0),
        "unfinished": args.jobs - len(finals),
        "start_order_max_displacement": displacement,
        "requeued_from_the_killed_replica": len(requeued),
        "requeued_succeeded": sum(
            finals.get(job_id, ("",))[0] == "succeeded" for job_id in requeued
        ),
        "redis_commands_per_job": round(commands / args.jobs, 1),
        # Each poll of the bench costs the replica that answers it one pipeline of 2 commands.
        "bench_polls_per_job": round(misses.get("polls", 0) / args.jobs, 1),
        "redis_commands_per_job_without_polls": round(
            (commands - 2 * misses.get("polls", 0)) / args.jobs, 1
        ),
        "redis_bytes_per_job": round(moved / args.jobs),
        "password_in_logs": REDIS_PASSWORD in logs,
        "expected_lost": sorted(lost_ids) if killed_at else [],
    }


def frozen(proc: subprocess.Popen) -> None:
    """Stops `proc` (SIGSTOP) and returns once the kernel reports it stopped."""
    proc.send_signal(signal.SIGSTOP)
    stat = Path(f"/proc/{proc.pid}/stat")
    deadline = time.monotonic() + 60
    while stat.read_text().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {proc.pid} did not stop")
        time.sleep(0.001)


async def running_on(store: Any, ids: list[str], replica: str) -> list[str]:
    """The ids of jobs the replica runs now, read from the store."""
    pipe = store.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(f"hunyuan:job:{job_id}", ["owner", "status"])
    rows = await pipe.execute()
    return [
        job_id
        for job_id, (owner, status) in zip(ids, rows, strict=True)
        if owner == replica.encode() and status == b"running"
    ]


async def job_stamps(store: Any, ids: list[str]) -> dict[str, tuple[float, float, int]]:
    """(started_at, finished_at, times requeued) of each job, wall clock, as the replicas
    stored them; a job is requeued when the replica that claimed it died before starting it."""
    pipe = store.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(f"hunyuan:job:{job_id}", ["started_at", "finished_at", "requeued"])
    rows = await pipe.execute()
    return {
        job_id: (float(started or 0), float(finished or 0), int(requeued or 0))
        for job_id, (started, finished, requeued) in zip(ids, rows, strict=True)
    }


async def redis_counts(store: Any) -> dict[str, int]:
    stats = await store.info("stats")
    return {
        "commands": int(stats["total_commands_processed"]),
        "bytes": int(stats["total_net_input_bytes"]) + int(stats["total_net_output_bytes"]),
    }


async def settle(
    client: Any,
    urls: list[str],
    ids: list[str],
    misses: dict[str, int],
    pick: Any = None,
    timeout_s: float = 300,
) -> dict[str, tuple[str, str | None]]:
    """Polls every job through a random replica until each ends: id -> (status, error code).
    404s are counted by code in `misses`, and every poll under "polls"."""
    finals: dict[str, tuple[str, str | None]] = {}
    deadline = time.monotonic() + timeout_s
    while len(finals) < len(ids) and time.monotonic() < deadline:
        for job_id in ids:
            if job_id in finals:
                continue
            url = pick.choice(urls) if pick else urls[0]
            reply = await client.get(f"{url}/v1/jobs/{job_id}")
            misses["polls"] = misses.get("polls", 0) + 1
            if reply.status_code == 404:
                code = reply.json()["error"]["code"]
                misses[code] = misses.get(code, 0) + 1
                continue
            job = reply.json()
            if job["status"] not in ("queued", "running"):
                finals[job_id] = (job["status"], job.get("error", {}).get("code"))
        await asyncio.sleep(0.05)
    return finals


def job_verdicts(result: dict[str, Any]) -> list[tuple[str, bool]]:
    lost = result["replica_lost"]
    return [
        (
            "jobs: three replicas faster than one",
            result["three_replicas_jobs_per_s"] > result["one_replica_jobs_per_s"],
        ),
        ("jobs: none lost, every one ended", result["unfinished"] == 0),
        ("jobs: no job_not_found from any replica", result["job_not_found"] == 0),
        (
            "jobs: the killed replica's running job ended replica_lost",
            result["killed_replica_running"] > 0 and sorted(lost) == result["expected_lost"],
        ),
        (
            "jobs: ...within the lease bound (4 heartbeats, plus one heartbeat of polling)",
            all(
                after <= result["lease_bound_s"] + result["heartbeat_s"]
                for after in result["replica_lost_after_kill_s"]
            ),
        ),
        ("jobs: every other job succeeded", result["succeeded"] == result["jobs"] - len(lost)),
        (
            "jobs: what the killed replica only claimed ran elsewhere",
            result["requeued_succeeded"] == result["requeued_from_the_killed_replica"],
        ),
        (
            "jobs: started in submission order, within the number of replicas",
            result["start_order_max_displacement"] < 3,
        ),
        ("jobs: the store's password is in no log", not result["password_in_logs"]),
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
    parser.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="instead: this many /v1/jobs jobs on a shared Redis store (redis-server needed)",
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.burst_seconds = 3.0, 4.0
    with tempfile.TemporaryDirectory(prefix="replicas-") as folder:
        if args.jobs:
            result = asyncio.run(measure_jobs(args, Path(folder)))
            checks = job_verdicts(result)
        else:
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

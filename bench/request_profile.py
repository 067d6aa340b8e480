"""Where a request's time goes: this service against the reference design, in-process.

Both apps answer `POST /infer` with an instant model (the ~16 KB text of bench/overhead.py),
driven through ASGI in this process with no sockets, so what remains is the request path
itself: routing, middleware, body checks, validation, admission, the worker's hand-off to the
model thread and back, metrics and serialisation. It prints:

- CPU microseconds per request (process time, all threads), medians of interleaved rounds;
- a cProfile of each, and the functions where the service spends more than the reference
  (profiled time per request: the profiler roughly doubles every number, so read them as
  shares, not as absolute costs).

    uv run python bench/request_profile.py                  # about a minute
    uv run python bench/request_profile.py --in-flight 32 --top 40
"""

import argparse
import asyncio
import cProfile
import os
import pstats
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.overhead import build_app

BODY = b'{"prompt": "hi"}'
HEADERS = [
    (b"host", b"127.0.0.1"),
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
]


def build(name: str) -> Any:
    """The app that bench/overhead.py serves as `name` ("reference" or "service")."""
    return build_app(name)[0]


async def one(app: Any) -> None:
    """One POST /infer through the app's ASGI interface; fails unless it answers 200."""
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the client stays
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/infer", "raw_path": b"/infer", "query_string": b"",
        "headers": HEADERS, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        "root_path": "", "state": {},
    }  # fmt: skip
    await app(scope, receive, send)
    assert sent[0]["status"] == 200, sent[:1]


async def run(app: Any, requests: int, in_flight: int, profiler: Any = None) -> float:
    """CPU microseconds per request over `requests`, `in_flight` at a time."""
    gate = asyncio.Semaphore(in_flight)

    async def limited() -> None:
        async with gate:
            await one(app)

    started = time.process_time()
    if profiler is not None:
        profiler.enable()
    await asyncio.gather(*(limited() for _ in range(requests)))
    if profiler is not None:
        profiler.disable()
    return 1e6 * (time.process_time() - started) / requests


async def measure(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, Any]]:
    apps = {name: build(name) for name in ("reference", "service")}
    cpu: dict[str, list[float]] = {name: [] for name in apps}
    profiles = {}
    reference, service = apps["reference"], apps["service"]
    async with (
        reference.router.lifespan_context(reference),
        service.router.lifespan_context(service),
    ):
        for app in apps.values():
            await run(app, 300, 1)  # warm-up
        for _ in range(args.rounds):
            for name, app in apps.items():
                cpu[name].append(await run(app, args.requests, args.in_flight))
        for name, app in apps.items():
            profiler = cProfile.Profile()
            await run(app, args.requests, args.in_flight, profiler)
            profiles[name] = pstats.Stats(profiler)
    return cpu, profiles


def per_function(stats: Any, requests: int) -> dict[str, tuple[float, float]]:
    """Profiled microseconds and calls per request, by function."""
    found: dict[str, tuple[float, float]] = {}
    for (path, _line, function), (_cc, calls, own, _cum, _callers) in stats.stats.items():
        if path == __file__:
            continue  # this script's own driver
        short = path.split("site-packages/")[-1].split("/src/")[-1].split("/lib/python3")[-1]
        key = f"{short}:{function}"
        old = found.get(key, (0.0, 0.0))
        found[key] = (old[0] + 1e6 * own / requests, old[1] + calls / requests)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--in-flight", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    cpu, profiles = asyncio.run(measure(args))
    reference, service = (statistics.median(cpu[name]) for name in ("reference", "service"))
    print(f"{args.requests} requests, {args.in_flight} in flight, medians of {args.rounds} rounds")
    print(f"CPU per request: reference {reference:.0f} us, service {service:.0f} us "
          f"({service - reference:+.0f} us, {service / reference:.2f}x)")  # fmt: skip
    ref, svc = (per_function(profiles[name], args.requests) for name in ("reference", "service"))
    print(f"profiled per request: reference {sum(v[0] for v in ref.values()):.0f} us, service "
          f"{sum(v[0] for v in svc.values()):.0f} us; where the service spends more:")  # fmt: skip
    rows = []
    for key in set(ref) | set(svc):
        (r_us, r_calls), (s_us, s_calls) = ref.get(key, (0.0, 0.0)), svc.get(key, (0.0, 0.0))
        rows.append((s_us - r_us, key, r_calls, s_calls))
    print("| extra us | calls: reference | calls: service | function |")
    print("| --- | --- | --- | --- |")
    for extra, key, r_calls, s_calls in sorted(rows, reverse=True)[: args.top]:
        print(f"| {extra:.1f} | {r_calls:.1f} | {s_calls:.1f} | `{key[:90]}` |")


if __name__ == "__main__":
    main()

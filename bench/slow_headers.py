"""Slow-header clients (slowloris) against the real service, without and with its header guard.

Each configuration starts `python -m hunyuan_service` (the tiny text2image model) and:

1. measures plain `/health` requests, each on a new connection and all on one kept-alive
   connection, for the guard's cost per request (both services up, rounds interleaved);
2. opens `--connections` connections that send their request headers one byte every
   `--byte-every-s` and never finish, for `--hold-s`; meanwhile a real client asks `/health`
   every 0.25 s on a new connection. It reports how many attack connections the server still
   holds over time, how long each was held, and what the real client got.

"before" is HEADER_TIMEOUT_S=0 (uvicorn's own protocol, as the service served until
2026-12-04); "after" is the default. Only ratios within one run compare (±15% swings here).

    uv run python bench/slow_headers.py [--connections 300] [--hold-s 30]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HEADER = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\nX-Padding: " + (
    b"a" * 4000
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "hunyuan_service"],
        env={**env, "PORT": str(port), "HOST": "127.0.0.1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as answer,
        ):
            if answer.status == 200:
                return process, port
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the service did not become ready")


def request_rate(port: int, count: int) -> tuple[float, float]:
    """/health requests per second: each on a new connection, then all on one connection."""
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    def read_response(connection: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += connection.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += connection.recv(65536)

    started = time.perf_counter()
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(request)
            read_response(connection)
    fresh = count / (time.perf_counter() - started)
    with socket.create_connection(("127.0.0.1", port)) as connection:
        started = time.perf_counter()
        for _ in range(count):
            connection.sendall(request)
            read_response(connection)
        kept = count / (time.perf_counter() - started)
    return fresh, kept


def attack(port: int, connections: int, byte_every_s: float, hold_s: float) -> dict[str, object]:
    """Opens the slow connections, trickles their headers, and watches them and a real client."""
    selector = selectors.DefaultSelector()
    opened_at: dict[socket.socket, float] = {}
    held_s: list[float] = []
    refused = 0
    for _ in range(connections):
        try:
            connection = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            refused += 1
            continue
        connection.setblocking(False)
        opened_at[connection] = time.monotonic()
        selector.register(connection, selectors.EVENT_READ)
    sent = dict.fromkeys(opened_at, 0)
    real: list[str] = []
    stop = threading.Event()

    def real_client() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    real.append(f"{r.status} {time.perf_counter() - started:.3f}")
            except urllib.error.HTTPError as error:
                real.append(f"{error.code} {time.perf_counter() - started:.3f}")
            except OSError:
                real.append("error")
            stop.wait(0.25)

    watcher = threading.Thread(target=real_client)
    watcher.start()
    start = time.monotonic()
    open_over_time: list[tuple[float, int]] = []
    next_byte = start
    next_sample = start
    while time.monotonic() - start < hold_s:
        now = time.monotonic()
        if now >= next_sample:
            open_over_time.append((now - start, len(opened_at)))
            next_sample += hold_s / 6
        if not opened_at:
            time.sleep(0.05)
        if now >= next_byte:
            for connection in list(opened_at):
                with contextlib.suppress(OSError):
                    connection.send(HEADER[sent[connection] : sent[connection] + 1])
                    sent[connection] += 1
            next_byte += byte_every_s
        for key, _ in selector.select(timeout=0.05) if opened_at else ():
            connection = key.fileobj
            assert isinstance(connection, socket.socket)
            try:
                data = connection.recv(65536)
            except OSError:
                data = b""
            if not data:  # closed by the server
                held_s.append(time.monotonic() - opened_at.pop(connection))
                selector.unregister(connection)
                connection.close()
    open_over_time.append((time.monotonic() - start, len(opened_at)))
    held_s += [hold_s] * len(opened_at)  # still open at the end: held the whole time
    for connection in opened_at:
        connection.close()
    stop.set()
    watcher.join()
    statuses = [entry.split()[0] for entry in real]
    latencies = [float(entry.split()[1]) for entry in real if entry != "error"]
    return {
        "refused at connect": refused,
        "open over time (s, open)": " ".join(f"{t:.0f}s:{n}" for t, n in open_over_time),
        "held (median / max s)": f"{statistics.median(held_s):.1f} / {max(held_s):.1f}",
        "real client /health": ", ".join(
            f"{code}: {statuses.count(code)}" for code in sorted(set(statuses))
        ),
        "real client median latency": (
            f"{statistics.median(latencies) * 1000:.1f} ms" if latencies else "none answered"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--byte-every-s", type=float, default=1.0)
    parser.add_argument("--hold-s", type=float, default=30.0)
    parser.add_argument("--requests", type=int, default=500, help="per round, for the cost")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="slow-headers-")
    base = {**os.environ, "MODEL_ID": "tiny", "DEVICE": "cpu", "CACHE_DIR": cache}
    configurations = {"before (HEADER_TIMEOUT_S=0)": "0", "after (HEADER_TIMEOUT_S=10)": "10"}
    services = {
        name: start_service({**base, "HEADER_TIMEOUT_S": timeout})
        for name, timeout in configurations.items()
    }
    names = list(services)
    try:
        # The per-request cost: both services up at once, rounds interleaved in alternating
        # order, medians compared.
        rates: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        for name in names:
            request_rate(services[name][1], 50)  # warm-up
        for round_ in range(args.rounds):
            for name in names if round_ % 2 == 0 else reversed(names):
                rates[name].append(request_rate(services[name][1], args.requests))
        results: dict[str, dict[str, object]] = {}
        for name in names:
            fresh = statistics.median(rate[0] for rate in rates[name])
            kept = statistics.median(rate[1] for rate in rates[name])
            results[name] = {
                "requests/s, new connection each": f"{fresh:.0f}",
                "requests/s, one kept-alive connection": f"{kept:.0f}",
            }
        for name in names:
            results[name].update(
                attack(services[name][1], args.connections, args.byte_every_s, args.hold_s)
            )
            print(f"{name}: {results[name]}", flush=True)
    finally:
        for process, _port in services.values():
            process.terminate()
            process.wait(timeout=60)
    print(
        f"\n{args.connections} slow-header connections, one header byte every "
        f"{args.byte_every_s:g} s, for {args.hold_s:g} s; LIMIT_CONCURRENCY 256; per-request "
        f"rates: medians of {args.rounds} interleaved rounds of {args.requests} /health requests"
    )
    print("| what | " + " | ".join(names) + " |")
    print("| --- | " + " | ".join("---" for _ in names) + " |")
    for row in results[names[0]]:
        print(f"| {row} | " + " | ".join(str(results[n][row]) for n in names) + " |")
    before, after = (results[n] for n in names)
    for row in ("requests/s, new connection each", "requests/s, one kept-alive connection"):
        ratio = float(str(after[row])) / float(str(before[row]))
        print(f"{row}: after/before {ratio:.3f}")


if __name__ == "__main__":
    main()

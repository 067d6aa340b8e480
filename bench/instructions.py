"""Machine instructions per request: this service against the reference design, in-process.

Timing a request path on a shared 2-core VM swings by more than the differences being looked
for (bench/overhead.py's rounds spread about 10%). Instructions do not: each app runs under
valgrind's callgrind, which counts every instruction the process executes, all threads, while
`--requests` instant requests go through the app's ASGI interface, `--in-flight` at a time, as
in bench/request_profile.py (no sockets). With `--sockets`, each runs instead as
bench/overhead.py serves it (uvicorn, and for the service its header-deadline protocol) and
this script sends the requests over `--in-flight` kept-alive connections. Counting starts after
a warm-up and stops after the last request; runs agree within about 0.5% in process and 1%
over sockets. Instructions are not time (cache misses and branch mispredictions cost
differently), but a change that removes work shows here at once.

Under valgrind everything runs about 50 times slower, which changes what the service's
timers do per request: a request would wait past the 50 ms after which the service watches
its client's disconnect (natively, here, it never does), and the sweep of its coarse timers,
every 25 ms while any is armed, would run once every other request instead of once in sixty.
The child stretches both by that factor (`SLOWDOWN`), so that each counts as often per request
as it runs natively.

    apt-get install valgrind                               # once
    uv run python bench/instructions.py                    # about 40 s
    uv run python bench/instructions.py --in-flight 1
    uv run python bench/instructions.py --sockets          # about 1 minute
"""

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SLOWDOWN = 50  # how much slower a request runs under callgrind than natively, about


def stretch_timers(app: object) -> None:
    """Runs the service's per-request timers as rarely per request as natively (see above)."""
    import hunyuan_service.engine.scheduler as scheduler

    scheduler.WATCH_AFTER_S *= SLOWDOWN
    engine = getattr(app.state, "engine", None)  # type: ignore[attr-defined]
    if engine is not None:  # the reference has none
        engine.alarms.tick_s *= SLOWDOWN


def child(name: str, requests: int, in_flight: int) -> None:
    """Runs inside valgrind: warms the app up, then counts only the measured requests."""
    from bench.request_profile import build, run

    async def main() -> None:
        app = build(name)
        stretch_timers(app)
        async with app.router.lifespan_context(app):
            await run(app, 300, in_flight)
            instrument(os.getpid(), True)
            await run(app, requests, in_flight)
            instrument(os.getpid(), False)

    asyncio.run(main())


def serve(name: str, port: int) -> None:
    """Runs inside valgrind: the app served as bench/overhead.py serves it."""
    from bench.overhead import serve as serve_app

    serve_app(name, port, prepare=stretch_timers)


BODY = b'{"prompt": "hi"}'
REQUEST = (
    b"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


async def send_requests(port: int, requests: int, connections: int) -> None:
    """`requests` POST /infer over `connections` kept-alive connections, each read in full."""

    async def one_connection(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(count):
            writer.write(REQUEST)
            status = await reader.readline()
            if b" 200 " not in status:
                raise RuntimeError(f"answered {status!r}")
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
        writer.close()

    share, extra = divmod(requests, connections)
    await asyncio.gather(*(one_connection(share + (i < extra)) for i in range(connections)))


def count_over_sockets(name: str, args: argparse.Namespace, command: list[str]) -> None:
    """Starts the server under valgrind, then counts `args.requests` sent to it."""
    from tests.conftest import free_port

    port = free_port()
    server = subprocess.Popen([*command, "--serve", name, "--port", str(port)])
    try:
        for _ in range(600):  # valgrind starts the server in tens of seconds
            if server.poll() is not None:
                raise RuntimeError(f"the {name} server exited with {server.returncode}")
            try:
                asyncio.run(send_requests(port, 1, 1))
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"the {name} server did not answer within 5 minutes")
        asyncio.run(send_requests(port, 20 * args.in_flight, args.in_flight))  # warm-up
        instrument(server.pid, True)
        asyncio.run(send_requests(port, args.requests, args.in_flight))
        instrument(server.pid, False)
    finally:
        server.terminate()
        server.wait(timeout=120)


def instrument(pid: int, on: bool) -> None:
    switch = ["callgrind_control", "-i", "on" if on else "off", str(pid)]
    subprocess.run(switch, check=True, capture_output=True)


def count(name: str, args: argparse.Namespace) -> float:
    """Instructions per request of app `name`, counted by callgrind in a child process."""
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "valgrind.log"
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--log-file={log}",
            f"--callgrind-out-file={Path(folder) / 'callgrind.out'}", sys.executable, __file__,
        ]  # fmt: skip
        if args.sockets:
            count_over_sockets(name, args, command)
        else:
            child_args = ["--child", name, "--requests", str(args.requests)]
            child_args += ["--in-flight", str(args.in_flight)]
            subprocess.run([*command, *child_args], check=True, stdout=subprocess.DEVNULL)
        collected = re.search(r"Collected : ([\d,]+)", log.read_text())
        if collected is None:
            raise RuntimeError(f"callgrind counted nothing for {name}:\n{log.read_text()}")
        return int(collected.group(1).replace(",", "")) / args.requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--sockets", action="store_true", help="served by uvicorn, over TCP")
    parser.add_argument("--child", choices=("reference", "service"))
    parser.add_argument("--serve", choices=("reference", "service"))
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.requests, args.in_flight)
        return
    if args.serve:
        serve(args.serve, args.port)
        return
    counts = {name: count(name, args) for name in ("reference", "service")}
    where = f"over {args.in_flight} connections" if args.sockets else "in process"
    print(f"{args.requests} requests, {args.in_flight} in flight {where}, counted by callgrind")
    for name, instructions in counts.items():
        ratio = instructions / counts["reference"]
        print(f"{name:10s} {instructions:12,.0f} instructions per request ({ratio:.3f}x)")


if __name__ == "__main__":
    main()

"""Machine instructions per request: this service against the reference design, in-process.

Timing a request path on a shared 2-core VM swings by more than the differences being looked
for (bench/overhead.py's rounds spread about 10%). Instructions do not: each app runs under
valgrind's callgrind, which counts every instruction the process executes, all threads, while
`--requests` instant requests go through the app's ASGI interface, `--in-flight` at a time, as
in bench/request_profile.py (no sockets). Counting starts after a warm-up and stops after the
last request; two runs agree within about 0.2%. Instructions are not time (cache misses and
branch mispredictions cost differently), but a change that removes work shows here at once.

Under valgrind everything runs about 50 times slower, so a request waits longer than the
50 ms after which the service starts to watch its client's disconnect, which natively, in
these benchmarks, it never reaches; the child raises that threshold so that both runs do
what they do natively.

    apt-get install valgrind                               # once
    uv run python bench/instructions.py                    # about 3 minutes
    uv run python bench/instructions.py --requests 4000 --in-flight 1
"""

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(name: str, requests: int, in_flight: int) -> None:
    """Runs inside valgrind: warms the app up, then counts only the measured requests."""
    import hunyuan_service.engine.scheduler as scheduler
    from bench.request_profile import build, run

    scheduler.WATCH_AFTER_S = 30.0  # see the module's docstring

    def instrument(on: bool) -> None:
        switch = ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())]
        subprocess.run(switch, check=True, capture_output=True)

    async def main() -> None:
        app = build(name)
        async with app.router.lifespan_context(app):
            await run(app, 300, in_flight)
            instrument(True)
            await run(app, requests, in_flight)
            instrument(False)

    asyncio.run(main())


def count(name: str, args: argparse.Namespace) -> float:
    """Instructions per request of app `name`, counted by callgrind in a child process."""
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "valgrind.log"
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--log-file={log}",
            f"--callgrind-out-file={Path(folder) / 'callgrind.out'}",
            sys.executable, __file__, "--child", name,
            "--requests", str(args.requests), "--in-flight", str(args.in_flight),
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        collected = re.search(r"Collected : ([\d,]+)", log.read_text())
        if collected is None:
            raise RuntimeError(f"callgrind counted nothing for {name}:\n{log.read_text()}")
        return int(collected.group(1).replace(",", "")) / args.requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--child", choices=("reference", "service"))
    args = parser.parse_args()
    if args.child:
        child(args.child, args.requests, args.in_flight)
        return
    counts = {name: count(name, args) for name in ("reference", "service")}
    print(f"{args.requests} requests, {args.in_flight} in flight, counted by callgrind")
    for name, instructions in counts.items():
        ratio = instructions / counts["reference"]
        print(f"{name:10s} {instructions:12,.0f} instructions per request ({ratio:.3f}x)")


if __name__ == "__main__":
    main()

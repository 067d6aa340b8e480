"""How long the event loop stalls while the service answers 1024x1024 JSON image requests.

A stalled loop delays every other connection: health probes, disconnect notices, responses.
The script serves the tiny FLUX model in-process, runs a 1 ms ticker inside the server's event
loop, and sends requests with curl from a separate process, so that no client work shares the
server's GIL. It prints the largest gaps between ticks, first with the server idle (the
baseline of this run), then under load.

    uv run python bench/loop_stall.py                 # about 40 s
    uv run python bench/loop_stall.py --requests 16 --side 1024
"""

import argparse
import asyncio
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--side", type=int, default=1024)
    args = parser.parse_args()

    from tests.conftest import LiveServer

    from hunyuan_service.api.app import create_app
    from hunyuan_service.settings import Settings

    cache = pathlib.Path(tempfile.gettempdir()) / "hunyuan-bench-cache"
    settings = Settings(_env_file=None, model_id="tiny", device="cpu", cache_dir=cache)
    app = create_app(settings)
    with LiveServer(app) as server:
        loop = app.state.engine.scheduler._task.get_loop()
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last - 0.001)
                last = now

        asyncio.run_coroutine_threadsafe(ticker(), loop)
        time.sleep(3)
        idle, gaps[:] = sorted(gaps)[-8:], []
        body = json.dumps(
            {"prompt": "x", "width": args.side, "height": args.side, "num_inference_steps": 1}
        )
        for _ in range(args.requests):
            out = subprocess.run(
                [
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{size_download}",
                    f"{server.url}/infer",
                    "-d",
                    body,
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            code, size = out.split()
            assert code == "200", out
        busy = sorted(gaps)[-8:]
    print(
        f"{args.requests} requests of {args.side}x{args.side}, JSON bodies of ~{int(size) >> 10} KB"
    )
    print("largest loop stalls, idle (ms):   ", [round(g * 1000, 1) for g in idle])
    print("largest loop stalls, serving (ms):", [round(g * 1000, 1) for g in busy])


if __name__ == "__main__":
    main()

"""Start-up time: `hunyuan-service` with the tiny demo model until `/ready` answers 200.

Against two baselines from the same run: a bare FastAPI app under uvicorn (the floor of any
Python HTTP service) and `python -c "import torch"` (the floor of any torch service). Rounds are
interleaved and medians reported, because absolute times swing ±15% here.

    uv run python bench/startup.py [--rounds 3] [--model-type text2image]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BARE_APP = """
from fastapi import FastAPI
app = FastAPI()
@app.get("/ready")
def ready():
    return {"ok": True}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def until_ready(command: list[str], env: dict[str, str], cwd: str | None = None) -> float:
    """Seconds from spawning `command` to its first 200 on /ready; stops it afterwards."""
    port = free_port()
    env = {**env, "PORT": str(port)}
    command = [part.replace("{port}", str(port)) for part in command]
    start = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[:3]} exited with {process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.02)
    finally:
        process.terminate()
        process.wait(timeout=60)


def import_torch() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-type", default="text2image")
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="startup-bench-")
    env = {**os.environ, "MODEL_ID": "tiny", "MODEL_TYPE": args.model_type, "CACHE_DIR": cache}
    service = [sys.executable, "-m", "hunyuan_service"]
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "bare.py").write_text(BARE_APP)
        bare = [sys.executable, "-m", "uvicorn", "bare:app", "--port", "{port}"]
        until_ready(service, env)  # builds the tiny checkpoint once; not timed
        # An install without bytecode (uv's default; `compile-bytecode` in pyproject.toml turns
        # it on): an empty pycache prefix that Python may not write to.
        no_bytecode = {**env, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": folder}
        times: dict[str, list[float]] = {
            "bare FastAPI": [],
            "import torch": [],
            "service": [],
            "service, no bytecode": [],
        }
        for round_ in range(args.rounds):
            times["bare FastAPI"].append(until_ready(bare, dict(os.environ), cwd=folder))
            times["import torch"].append(import_torch())
            times["service"].append(until_ready(service, env))
            times["service, no bytecode"].append(until_ready(service, no_bytecode))
            print(
                f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())
            )
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{args.model_type}, tiny model, median of {args.rounds} rounds")
    print("| what | seconds to ready | vs import torch |")
    print("| --- | --- | --- |")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.2f} | {seconds / medians['import torch']:.2f} |")


if __name__ == "__main__":
    main()

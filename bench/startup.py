"""Start-up time: `hunyuan-service` with the tiny demo model until `/ready` answers 200.

Against three baselines from the same run: a bare FastAPI app under uvicorn (the floor of any
Python HTTP service), `python -c "import torch"` (the floor of any torch service), and importing
just what the model needs from torch, transformers and diffusers (the floor of any service of
this model through these libraries). Rounds are interleaved and medians reported, because
absolute times swing ±15% here.

/ready is polled every `--poll-ms` (100 by default): each poll is a request the starting
service answers while it imports, so polling much faster slows what it measures (with 20 ms
polls the service took 1.06x its libraries' import time, with 100 ms polls 0.99x); Kubernetes
polls at most once a second.

    uv run python bench/startup.py [--rounds 3] [--model-type text2image] [--poll-ms 100]
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

ROOT = str(Path(__file__).resolve().parents[1])

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


LIBRARY_IMPORTS = {
    "text2image": "import torch, transformers.modeling_utils; from diffusers import FluxPipeline",
    "image2text": "import torch, qwen_vl_utils; "
    "from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration",
}


def until_ready(
    command: list[str], env: dict[str, str], poll_s: float, cwd: str | None = None
) -> float:
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
                time.sleep(poll_s)
    finally:
        process.terminate()
        process.wait(timeout=60)


def run_python(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-type", default="text2image", choices=sorted(LIBRARY_IMPORTS))
    parser.add_argument("--poll-ms", type=float, default=100)
    args = parser.parse_args()
    poll_s = args.poll_ms / 1000
    cache = tempfile.mkdtemp(prefix="startup-bench-")
    env = {**os.environ, "MODEL_ID": "tiny", "MODEL_TYPE": args.model_type, "CACHE_DIR": cache}
    service = [sys.executable, "-m", "hunyuan_service"]
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "bare.py").write_text(BARE_APP)
        bare = [sys.executable, "-m", "uvicorn", "bare:app", "--port", "{port}"]
        until_ready(service, env, poll_s)  # builds the tiny checkpoint once; not timed
        # An install without bytecode where Python may not cache it either (uv's default with
        # PYTHONDONTWRITEBYTECODE set): an empty pycache prefix that Python may not write to.
        no_bytecode = {**env, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": folder}
        # The README's command, `uv run hunyuan-service`, with uv's environment check counted;
        # and the same with uv's `compile-bytecode` on, which pyproject.toml had until
        # 2026-12-04 and which made every `uv run` recompile the environment (uv#12202).
        uv_run = ["uv", "run", "--frozen", "hunyuan-service"]
        recompiling = {**env, "UV_COMPILE_BYTECODE": "1"}
        times: dict[str, list[float]] = {
            "bare FastAPI": [],
            "import torch": [],
            "the model's libraries": [],
            "service": [],
            "service, no bytecode": [],
            "uv run hunyuan-service": [],
            "uv run, compile-bytecode on": [],
        }
        for round_ in range(args.rounds):
            times["bare FastAPI"].append(until_ready(bare, dict(os.environ), poll_s, folder))
            times["import torch"].append(run_python("import torch"))
            times["the model's libraries"].append(run_python(LIBRARY_IMPORTS[args.model_type]))
            times["service"].append(until_ready(service, env, poll_s))
            times["service, no bytecode"].append(until_ready(service, no_bytecode, poll_s))
            times["uv run hunyuan-service"].append(until_ready(uv_run, env, poll_s, ROOT))
            times["uv run, compile-bytecode on"].append(
                until_ready(uv_run, recompiling, poll_s, ROOT)
            )
            print(
                f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())
            )
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"\n{args.model_type}, tiny model, /ready polled every {args.poll_ms:g} ms, "
        f"median of {args.rounds} rounds"
    )
    libraries = medians["the model's libraries"]
    print("| what | seconds to ready | vs import torch | vs the model's libraries |")
    print("| --- | --- | --- | --- |")
    for name, seconds in medians.items():
        torch_ratio = seconds / medians["import torch"]
        print(f"| {name} | {seconds:.2f} | {torch_ratio:.2f} | {seconds / libraries:.2f} |")


if __name__ == "__main__":
    main()

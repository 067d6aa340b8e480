"""Fetches the wheels an offline CUDA host needs to run bench/gpu.py and the GPU tests.

A GPU host that reaches no package index, but has its own CUDA build of torch, gets this
project's other runtime packages as wheels, at the versions `uv.lock` pins, for its Python
(CPython 3.12 on x86-64 Linux by default). `bench/gpu_host.sh` installs them there and runs
the checks. The names are what such a host lacked or held at another version on 2026-12-04
(the lent H200: torch 2.11, transformers 5.17; see `docs/benchmarks.md`), and isal and
pybase64, dependencies since 2026-12-07; huggingface-hub is left out on purpose: the lock's
2.x imports `httpx2`, which that host lacks, and its own 1.33 works with the lock's
transformers.

    uv run python bench/offline_wheels.py               # into .whl/, about 33 MiB
    uv run python bench/offline_wheels.py --dest DIR --python 3.12
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WHEELS = (
    "annotated-types",
    "diffusers",
    "fastapi",
    "importlib-metadata",
    "isal",
    "llguidance",
    "opentelemetry-api",
    "peft",
    "pybase64",
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "python-dotenv",
    "python-multipart",
    "qwen-vl-utils",
    "safetensors",
    "starlette",
    "tokenizers",
    "torchao",
    "transformers",
    "typing-inspection",
    "uvicorn",
)

# pip matches a manylinux tag exactly, so every glibc level a wheel may be built for is named.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


# Each package in uv.lock opens with its name and version (tomllib would need Python 3.11).
LOCKED = re.compile(r'^\[\[package\]\]\nname = "([^"]+)"\nversion = "([^"]+)"', re.MULTILINE)


def pinned(names: tuple[str, ...], lock: Path) -> list[str]:
    """`name==version` for each name, the version from the lock; a name it lacks is an error."""
    versions = dict(LOCKED.findall(lock.read_text()))
    missing = [name for name in names if name not in versions]
    if missing:
        raise SystemExit(f"not in {lock.name}: {', '.join(missing)}")
    return [f"{name}=={versions[name]}" for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    parser.add_argument("--python", default="3.12", help="the host's Python version")
    args = parser.parse_args()
    requirements = pinned(WHEELS, ROOT / "uv.lock")
    platforms = [option for tag in PLATFORMS for option in ("--platform", tag)]
    # pip from PyPI through uvx: uv's own environments have no pip.
    command = ["uvx", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", args.python, "--implementation", "cp", *platforms]
    subprocess.run([*command, "--dest", str(args.dest), *requirements], check=True)
    wheels = sorted(args.dest.glob("*.whl"))
    size = sum(path.stat().st_size for path in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB, in {args.dest}", file=sys.stderr)


if __name__ == "__main__":
    main()

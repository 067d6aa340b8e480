"""What an operator sees at start-up: only the service's own log lines, for either model type."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.service_process import ServiceProcess, tiny_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# The log format of `hunyuan_service.logs`, from one of the service's own loggers.
OWN_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) hunyuan_service[\w.]*: "
)


@pytest.mark.parametrize(
    ("model_type", "body"),
    [
        ("text2image", {"prompt": "a fox", "width": 64, "height": 64}),
        ("image2text", {"prompt": "hello", "max_new_tokens": 4}),
    ],
)
def test_the_demo_prints_only_the_services_own_lines_from_start_to_stop(
    tiny_cache: Path, model_type: str, body: dict
) -> None:
    with ServiceProcess(tiny_env(tiny_cache, MODEL_TYPE=model_type)) as service:
        assert httpx.post(f"{service.url}/infer", json=body, timeout=120).status_code == 200
        service.terminate()
        assert service.wait(timeout=120) == 0
        lines = service.log().splitlines()
    foreign = [line for line in lines if not OWN_LINE.match(line)]
    assert foreign == []
    messages = [OWN_LINE.sub("", line) for line in lines]
    assert messages[0].startswith("listening on http://127.0.0.1:")
    assert any(m.startswith("ready ") for m in messages)
    assert messages[-1].startswith("stopped ")


def test_uv_run_does_not_recompile_the_environment_on_every_start() -> None:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    env = {k: v for k, v in os.environ.items() if k != "UV_COMPILE_BYTECODE"}
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(
        [uv, "run", "--frozen", "python", "-c", "pass"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Bytecode compiled" not in done.stderr

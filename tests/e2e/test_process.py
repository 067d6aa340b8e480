"""The real `hunyuan-service` process over real HTTP: serving, concurrency, and drain on SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import free_port
from tests.service_process import ServiceProcess, tiny_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flux_process(tiny_cache: Path) -> Iterator[ServiceProcess]:
    with ServiceProcess(tiny_env(tiny_cache)) as service:
        yield service


def test_curl_style_request_returns_a_64x64_png(flux_process: ServiceProcess) -> None:
    response = httpx.post(
        f"{flux_process.url}/infer",
        content=b'{"prompt":"a red fox","width":64,"height":64}',
        timeout=60,
    )
    assert response.status_code == 200
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["image_base64"])))
    assert (image.format, image.size) == ("PNG", (64, 64))


def test_five_concurrent_reference_clients_all_get_images(flux_process: ServiceProcess) -> None:
    prompts = ["A beautiful sunset", "A cat", "Mountains", "A city at night", "A conference"]
    results: list[tuple[int, tuple[int, int]]] = []

    def client(prompt: str) -> None:
        response = httpx.post(f"{flux_process.url}/infer", json={"prompt": prompt}, timeout=300)
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["image_base64"])))
        results.append((response.status_code, image.size))

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert results == [(200, (1024, 1024))] * 5


def test_health_reports_the_demo(flux_process: ServiceProcess) -> None:
    body = httpx.get(f"{flux_process.url}/health").json()
    assert body["demo"] is True
    assert "DEMO MODEL" in flux_process.log()


def test_sigterm_drains_admitted_jobs_then_exits_zero(tiny_cache: Path) -> None:
    # The drain budget only has to outlast three jobs on a loaded machine: a hang still fails.
    with ServiceProcess(tiny_env(tiny_cache, SHUTDOWN_TIMEOUT_S="900")) as service:
        # About 1.8 s per job on an idle development machine (57 s was seen under heavy load),
        # so all three are in flight at once.
        body = {"prompt": "slow", "width": 512, "height": 512, "num_inference_steps": 100}
        outcomes: dict[int, int] = {}

        def client(i: int) -> None:
            response = httpx.post(f"{service.url}/infer", json=body, timeout=900)
            outcomes[i] = response.status_code

        def health() -> dict:
            return httpx.get(f"{service.url}/health").json()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        deadline = time.monotonic() + 30
        for i, thread in enumerate(threads):
            thread.start()
            # Admit one at a time: the first runs, the others wait in the queue.
            while health()["queue_depth"] + int(health()["busy"]) < i + 1:
                assert time.monotonic() < deadline, "jobs never queued"
                time.sleep(0.01)
        assert health()["queue_depth"] == 2
        service.terminate()
        service.terminate()  # as `uv run` forwarding plus `pkill -f` deliver it: twice
        # The drain keeps listening: a new request and the readiness probe get a 503 with
        # Retry-After at once (a load balancer then sends the request elsewhere), as long as
        # admitted jobs remain.
        wait_for_drain(service)
        late = httpx.post(f"{service.url}/infer", json=body, timeout=60)
        assert late.status_code == 503
        assert late.headers["Retry-After"] == "1"
        assert late.json()["error"]["code"] == "unavailable"
        ready = httpx.get(f"{service.url}/ready", timeout=60)
        assert (ready.status_code, ready.json()["state"]) == (503, "draining")
        for thread in threads:
            thread.join(timeout=900)
        assert service.wait(timeout=120) == 0
        assert outcomes == {0: 200, 1: 200, 2: 200}


def wait_for_drain(service: ServiceProcess) -> None:
    """Until the log says the drain began (the signal is handled on the service's loop)."""
    deadline = time.monotonic() + 120
    while "draining: no new requests" not in service.log():
        assert time.monotonic() < deadline, "the drain never began"
        time.sleep(0.01)


def test_jobs_that_outlive_the_drain_get_a_503_shutdown_and_the_process_exits_zero(
    tiny_cache: Path,
) -> None:
    env = tiny_env(tiny_cache, SHUTDOWN_TIMEOUT_S="2", MAX_INFERENCE_STEPS="1000")
    with ServiceProcess(env) as service:
        # Far longer than the 2 s drain on any machine; stopped at its next step afterwards.
        body = {"prompt": "slow", "width": 2048, "height": 2048, "num_inference_steps": 1000}
        answers: dict[str, Any] = {}

        def plain() -> None:
            answers["plain"] = httpx.post(f"{service.url}/infer", json=body, timeout=600)

        def streamed() -> None:
            with httpx.stream(
                "POST", f"{service.url}/infer", json={**body, "stream": True}, timeout=600
            ) as response:
                answers["stream"] = (response.status_code, response.read().decode())

        def health() -> dict:
            return httpx.get(f"{service.url}/health").json()

        threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
        threads[0].start()
        wait_until_true(lambda: health()["busy"])
        threads[1].start()
        wait_until_true(lambda: health()["queue_depth"] == 1)
        service.terminate()
        for thread in threads:
            thread.join(timeout=600)
        assert service.wait(timeout=120) == 0

    response = answers["plain"]
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["code"] == "shutdown"
    status, text = answers["stream"]
    assert status == 200
    events = [block for block in text.strip().split("\n\n") if not block.startswith(":")]
    assert events[-1].splitlines()[1] == "event: error"
    assert json.loads(events[-1].splitlines()[2].removeprefix("data: "))["error"]["code"] == (
        "shutdown"
    )
    log = service.log()
    assert "Traceback" not in log
    assert "client_disconnected" not in log
    ended = [line for line in log.splitlines() if "reason=shutdown" in line]
    assert len(ended) == 2  # one line for each job, the running one and the queued one
    assert {"stage=running", "stage=queued"} == {line.split()[-1] for line in ended}


def wait_until_true(condition: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def run_command(
    env: dict[str, str], *arguments: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("hunyuan-service")
    full_env = {**os.environ, "HOST": "127.0.0.1", **env}
    return subprocess.run(
        [str(script), *arguments],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_busy_port_fails_at_once_with_one_line_and_exit_4(tiny_cache: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_command(tiny_env(tiny_cache, PORT=str(port)))
    assert done.returncode == 4
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert lines == [f"hunyuan-service: cannot listen on 127.0.0.1:{port}: Address already in use; "
                     "stop what uses it or set PORT"]  # fmt: skip
    assert "loading model" not in done.stderr  # refused before the model, not after it


def test_a_model_neither_cached_nor_reachable_fails_with_one_line_and_exit_3(
    tiny_cache: Path,
) -> None:
    env = tiny_env(tiny_cache, MODEL_ID="someorg/not-a-model", PORT=str(free_port()))
    done = run_command({**env, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 3
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "cannot start" in line]
    assert line.endswith(
        "cannot start: MODEL_ID=someorg/not-a-model: not in the local Hugging Face cache, and the "
        "Hub cannot be reached (offline, or no network); fetch it where the Hub is reachable "
        "(`MODEL_ID=someorg/not-a-model hunyuan-service download`), or set MODEL_ID to a local "
        "folder"
    )


def test_sigint_twice_after_start_exits_zero_without_a_traceback(tiny_cache: Path) -> None:
    with ServiceProcess(tiny_env(tiny_cache)) as service:
        assert service.proc is not None
        service.proc.send_signal(signal.SIGINT)  # the terminal's Ctrl+C ...
        service.proc.send_signal(signal.SIGINT)  # ... and `uv run` forwarding it
        assert service.wait(timeout=120) == 0
        assert "Traceback" not in service.log()


def test_stalled_headers_get_a_408_and_requests_over_limit_concurrency_a_503(
    tiny_cache: Path,
) -> None:
    env = tiny_env(tiny_cache, LIMIT_CONCURRENCY="8", HEADER_TIMEOUT_S="1")
    with ServiceProcess(env) as service:
        # The command serves with the header deadline (api/slow_clients.py).
        with socket.create_connection(("127.0.0.1", service.port)) as stalled:
            stalled.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            stalled.settimeout(120)
            assert stalled.recv(4096).startswith(b"HTTP/1.1 408 Request Timeout")
        # Requests whose headers arrived and whose body never comes fill the limit.
        waiting = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(8)]
        try:
            for connection in waiting:
                connection.sendall(
                    b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
                )
            deadline = time.monotonic() + 60
            while httpx.get(f"{service.url}/health", timeout=60).status_code != 503:
                assert time.monotonic() < deadline, "the requests never filled the limit"
                time.sleep(0.05)
        finally:
            for connection in waiting:
                connection.close()
        # Once they are gone, the service answers again (uvicorn notices closes at once, but
        # the closes travel through the kernel: wait for them, boundedly).
        deadline = time.monotonic() + 60
        while httpx.get(f"{service.url}/health", timeout=60).status_code != 200:
            assert time.monotonic() < deadline, "the service never recovered"
            time.sleep(0.05)


def test_download_prepares_the_model_and_says_where(tiny_cache: Path) -> None:
    done = run_command(tiny_env(tiny_cache), "download")
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip().rsplit(" is in ", 1)[1])
    assert (folder / "model_index.json").is_file()
    assert folder.parent == tiny_cache


def test_download_without_the_hub_fails_with_one_line_and_exit_3(tiny_cache: Path) -> None:
    env = {**tiny_env(tiny_cache, MODEL_ID="someorg/not-a-model"), "HF_HUB_OFFLINE": "1"}
    done = run_command(env, "download")
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "cannot download" in line]
    assert "MODEL_ID=someorg/not-a-model: not in the local Hugging Face cache" in line


def test_unknown_arguments_are_refused_with_the_usage(tiny_cache: Path) -> None:
    done = run_command(tiny_env(tiny_cache), "serve", "--now")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "usage: hunyuan-service [-h] [--version] COMMAND ...",
        "hunyuan-service: error: unrecognized arguments: --now",
    ]


@pytest.mark.parametrize("command", [[], ["download"], ["serve"]])
def test_help_lists_every_setting_with_its_default_and_exits_zero(
    tiny_cache: Path, command: list[str]
) -> None:
    from hunyuan_service.settings import settings_table

    done = run_command(tiny_env(tiny_cache), *command, "--help", timeout=60)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith("usage: hunyuan-service")
    for variable, default, _meaning in settings_table():
        assert f"  {variable} (default: {default})" in text
    assert "SHUTDOWN_TIMEOUT_S (default: 30.0)" in text
    assert "exit codes:" in text
    assert "loading model" not in done.stderr  # help never starts anything


def test_version_prints_the_package_version(tiny_cache: Path) -> None:
    from hunyuan_service import __version__

    done = run_command(tiny_env(tiny_cache), "--version", timeout=60)
    assert (done.returncode, done.stdout) == (0, f"hunyuan-service {__version__}\n")

"""Starts the real `hunyuan-service` command as a subprocess on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port


def tiny_env(cache: Path, **extra: str) -> dict[str, str]:
    """The environment of a service on the tiny demo model, on the CPU, with `extra` on top."""
    return {"MODEL_ID": "tiny", "DEVICE": "cpu", "CACHE_DIR": str(cache), **extra}


class ServiceProcess:
    """The installed console script, run with the given environment, torn down on exit."""

    def __init__(self, env: dict[str, str], startup_timeout_s: float = 120) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), **env}
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[str] | None = None
        self.log_path: Path | None = None

    def __enter__(self) -> ServiceProcess:
        script = Path(sys.executable).with_name("hunyuan-service")
        log = open(Path(self.env.get("CACHE_DIR", "/tmp")) / f"service-{self.port}.log", "w+")
        self.log_path = Path(log.name)
        self.proc = subprocess.Popen(
            [str(script)], env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"service not ready in time:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __exit__(self, *_exc: Any) -> None:
        self.stop()

"""A real redis-server (Debian's package) on a free loopback port, persistence off."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

needs_redis = pytest.mark.skipif(
    not Path(REDIS_SERVER).exists(),
    reason="needs redis-server (apt-get install redis-server; .ci/run installs it)",
)


class RedisServer:
    """Starts `redis-server` on `port` (a free one by default); `stop` and `start` again keep
    the port, so a service can see the store go away and come back."""

    def __init__(self, folder: Path, password: str | None = None) -> None:
        self.folder, self.password = folder, password
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.folder), "--protected-mode", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self.ping():
            assert self.proc.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not answer in time"
            time.sleep(0.05)
        return self

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)

    def ping(self) -> bool:
        import redis

        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

"""Helpers for tests against a live server with fake models: polling, metrics, background posts."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from tests.metrics import value

SMALL = {"width": 64, "height": 64}


def counter(url: str, outcome: str) -> int:
    return int(value(httpx.get(f"{url}/metrics").text, "hunyuan_jobs_total", outcome=outcome))


def wait_until(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def queue_depth(url: str) -> int:
    return httpx.get(f"{url}/health").json()["queue_depth"]


def post_in_background(url: str, body: dict, results: dict, key: Any, timeout: float = 30):
    def run() -> None:
        try:
            results[key] = httpx.post(f"{url}/infer", json=body, timeout=timeout)
        except httpx.TimeoutException:
            results[key] = "client-timeout"

    thread = threading.Thread(target=run)
    thread.start()
    return thread

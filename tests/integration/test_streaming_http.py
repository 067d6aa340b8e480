"""Streaming mechanics over real HTTP with fake models: keep-alive, positions, disconnects."""

from __future__ import annotations

import threading
from typing import Any

import httpx

from tests.fakes import FakeImageModel
from tests.integration.live import (
    SMALL,
    counter,
    post_in_background,
    queue_depth,
    wait_until,
)
from tests.sse import parse_sse


def test_queued_stream_gets_keepalives_and_position_updates(serve: Any) -> None:
    model = FakeImageModel(steps=3, step_s=0.001)
    model.gate.clear()
    url = serve(model, stream_keepalive_s=0.1)
    results: dict = {}
    blockers = [post_in_background(url, {"prompt": f"b{i}", **SMALL}, results, i) for i in (0, 1)]
    wait_until(lambda: counter(url, "admitted") == 2)
    collected: list[str] = []
    three_keepalives = threading.Event()

    def stream() -> None:
        body = {"prompt": "watcher", "stream": True, **SMALL}
        with httpx.stream("POST", f"{url}/infer", json=body, timeout=30) as response:
            for text in response.iter_text():
                collected.append(text)
                if "".join(collected).count(": keep-alive") >= 3:
                    three_keepalives.set()

    watcher = threading.Thread(target=stream)
    watcher.start()
    # Queued behind two jobs with the gate closed, only keep-alives can flow until it opens.
    assert three_keepalives.wait(timeout=60), "no keep-alives while queued"
    model.gate.set()
    watcher.join()
    for thread in blockers:
        thread.join()
    events = parse_sse("".join(collected))
    kinds = [name for name, _ in events]
    assert kinds.index("comment") < kinds.index("started")
    assert kinds.count("comment") >= 3
    positions = [data["position"] for name, data in events if name == "queued"]
    assert positions[0] == 2
    assert positions == sorted(positions, reverse=True)
    assert positions[-1] == 1
    assert kinds[-1] == "result"


def test_dropping_a_stream_cancels_its_running_job(serve: Any) -> None:
    model = FakeImageModel(steps=1000, step_s=0.01)
    url = serve(model)
    body = {"prompt": "watched", "stream": True, **SMALL}
    with httpx.stream("POST", f"{url}/infer", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("event: progress"):
                break  # the client leaves mid-job
    wait_until(lambda: counter(url, "cancelled_running_client_disconnected") == 1, timeout=5)
    assert model.log.stopped_early == ["watched"]
    assert model.log.steps_run < 100
    assert queue_depth(url) == 0

"""Backpressure, deadlines, cancellation and faults over real HTTP, with fake models."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from hunyuan_service.api.app import create_app
from tests.conftest import LiveServer
from tests.fakes import FakeImageModel, fake_settings
from tests.integration.live import SMALL, counter, post_in_background, queue_depth, wait_until


def test_waiting_requests_are_served_in_arrival_order(serve: Any) -> None:
    model = FakeImageModel(steps=1, step_s=0.001)
    model.gate.clear()
    url = serve(model, max_queue_size=10)
    results: dict = {}
    threads = []
    for i in range(8):
        threads.append(post_in_background(url, {"prompt": f"p{i}", **SMALL}, results, i))
        # Wait until each request is admitted before sending the next, to fix arrival order.
        wait_until(lambda i=i: counter(url, "admitted") == i + 1)
    model.gate.set()
    for thread in threads:
        thread.join()
    assert [results[i].status_code for i in range(8)] == [200] * 8
    assert [call.prompt for call in model.calls] == [f"p{i}" for i in range(8)]
    assert model.max_active == 1


def test_overflow_gets_503_with_numeric_retry_after(serve: Any) -> None:
    model = FakeImageModel()
    model.gate.clear()
    url = serve(model, max_queue_size=2)
    results: dict = {}
    threads = []
    for i in range(3):  # one at a time, so the first is running before the others queue
        threads.append(post_in_background(url, {"prompt": f"p{i}", **SMALL}, results, i))
        wait_until(lambda i=i: counter(url, "admitted") == i + 1)
    wait_until(lambda: queue_depth(url) == 2)
    # Answered while the gate is still closed: a request that waited for a place would hang.
    response = httpx.post(f"{url}/infer", json={"prompt": "overflow", **SMALL}, timeout=30)
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "queue_full"
    model.gate.set()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in results.values()) == [200, 200, 200]
    assert "overflow" not in [call.prompt for call in model.calls]


def test_deadline_gives_504_and_a_request_may_shorten_it(serve: Any) -> None:
    model = FakeImageModel(steps=1000, step_s=0.01)
    url = serve(model, request_timeout_s=0.5)
    started = time.monotonic()
    response = httpx.post(f"{url}/infer", json={"prompt": "slow", **SMALL}, timeout=60)
    assert response.status_code == 504
    assert time.monotonic() - started >= 0.5  # never before the deadline
    assert "(0.5 s)" in response.json()["error"]["message"]
    wait_until(lambda: counter(url, "cancelled_running_deadline") == 1)
    assert model.log.stopped_early == ["slow"]  # stopped, not run to its 1000th step
    assert model.log.steps_run < 1000
    body = {"prompt": "s", "timeout_s": 0.2, **SMALL}
    response = httpx.post(f"{url}/infer", json=body, timeout=60)
    assert response.status_code == 504
    assert "(0.2 s)" in response.json()["error"]["message"]  # the request's own budget
    wait_until(lambda: counter(url, "cancelled_running_deadline") == 2)


def test_disconnected_queued_job_never_runs(serve: Any) -> None:
    model = FakeImageModel(steps=1, step_s=0.001)
    model.gate.clear()
    url = serve(model)
    results: dict = {}
    first = post_in_background(url, {"prompt": "running", **SMALL}, results, "running")
    wait_until(lambda: httpx.get(f"{url}/health").json()["busy"])
    gone = post_in_background(url, {"prompt": "gone", **SMALL}, results, "gone", timeout=0.5)
    gone.join()
    assert results["gone"] == "client-timeout"
    wait_until(lambda: counter(url, "cancelled_queued_client_disconnected") == 1)
    assert queue_depth(url) == 0
    model.gate.set()
    first.join()
    assert results["running"].status_code == 200
    assert [call.prompt for call in model.calls] == ["running"]


def test_running_job_stops_within_a_step_of_its_client_leaving(serve: Any) -> None:
    model = FakeImageModel(steps=1000, step_s=0.01)
    url = serve(model)
    results: dict = {}
    post_in_background(url, {"prompt": "long", **SMALL}, results, "long", timeout=0.5).join()
    assert results["long"] == "client-timeout"
    wait_until(lambda: counter(url, "cancelled_running_client_disconnected") == 1, timeout=5)
    assert model.log.stopped_early == ["long"]  # stopped, not run to its 1000th step
    assert model.log.steps_run < 1000
    model.steps = 2
    response = httpx.post(f"{url}/infer", json={"prompt": "next", **SMALL}, timeout=60)
    assert response.status_code == 200


def test_model_error_and_out_of_memory_fail_only_their_own_request(serve: Any) -> None:
    model = FakeImageModel()
    url = serve(model)
    boom = httpx.post(f"{url}/infer", json={"prompt": "boom", **SMALL})
    assert boom.status_code == 500
    error = boom.json()["error"]
    assert boom.headers["x-request-id"] in error["message"]
    assert "exploded" not in boom.text
    assert "Traceback" not in boom.text
    oom = httpx.post(f"{url}/infer", json={"prompt": "oom", **SMALL})
    assert oom.status_code == 500
    assert oom.json()["error"]["code"] == "out_of_memory"
    assert "smaller size" in oom.json()["error"]["message"]
    assert model.oom_recoveries == 1
    assert httpx.post(f"{url}/infer", json={"prompt": "fine", **SMALL}).status_code == 200
    assert counter(url, "failed") == 1
    assert counter(url, "out_of_memory") == 1


def test_dead_worker_turns_health_503_and_refuses_requests() -> None:
    model = FakeImageModel()
    app = create_app(fake_settings(), model=model)
    with LiveServer(app) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        scheduler = app.state.engine.scheduler
        loop_task = scheduler._task
        loop_task.get_loop().call_soon_threadsafe(loop_task.cancel)
        wait_until(lambda: not scheduler.worker_alive)
        assert httpx.get(f"{server.url}/health").status_code == 503
        assert httpx.get(f"{server.url}/ready").status_code == 503
        response = httpx.post(f"{server.url}/infer", json={"prompt": "x", **SMALL}, timeout=5)
        assert response.status_code == 503
        assert "restart" in response.json()["error"]["message"]


def test_full_queue_refuses_before_fetching_or_decoding_images(serve: Any) -> None:
    """Cheap rejection: with the queue full, even a hostile image is answered 503, untouched."""
    from tests.images import bomb_png, data_uri

    model = FakeImageModel()
    model.gate.clear()
    url = serve(model, model_type="image2text", max_queue_size=1)
    results: dict = {}
    threads = []
    for i in range(2):
        threads.append(post_in_background(url, {"prompt": f"p{i}"}, results, i))
        wait_until(lambda i=i: counter(url, "admitted") == i + 1)
    wait_until(lambda: queue_depth(url) == 1)
    for image in (data_uri(bomb_png()), "http://169.254.169.254/latest/meta-data"):
        response = httpx.post(f"{url}/infer", json={"prompt": "x", "images": [image]})
        assert response.status_code == 503
    model.gate.set()
    for thread in threads:
        thread.join()
    assert [results[i].json()["text"] for i in range(2)] == ["fake answer"] * 2


def test_client_hanging_up_mid_upload_is_not_a_server_error(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import socket
    from urllib.parse import urlsplit

    url = serve(FakeImageModel())
    parts = urlsplit(url)
    caplog.set_level("INFO")
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(
            b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 5000\r\n\r\n{"prompt": "x'
        )
    # The handler was reading the body when the client left: wait for it to say so.
    wait_until(lambda: any("during upload" in r.getMessage() for r in caplog.records))
    assert httpx.post(f"{url}/infer", json={"prompt": "after", **SMALL}).status_code == 200
    assert not [r for r in caplog.records if r.levelname == "ERROR"]

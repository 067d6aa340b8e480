"""/metrics after a burst: every count agrees with what the clients saw."""

from __future__ import annotations

import platform
from typing import Any

import httpx

from tests.fakes import FakeImageModel
from tests.integration.live import (
    SMALL,
    counter,
    post_in_background,
    wait_until,
)
from tests.metrics import samples, value


def test_counts_after_a_burst_agree_with_the_clients(serve: Any) -> None:
    model = FakeImageModel(steps=2, step_s=0.001)
    model.gate.clear()  # the first job holds the worker until the burst is settled
    url = serve(model, max_queue_size=3)
    results: dict = {}
    threads = [post_in_background(url, {"prompt": f"p{i}", **SMALL}, results, i) for i in range(10)]
    refused = lambda: sum(  # noqa: E731
        1 for r in results.values() if not isinstance(r, str) and r.status_code == 503
    )
    # Every request is either admitted (running or queued) or already answered 503.
    wait_until(lambda: counter(url, "admitted") + refused() == 10, timeout=60)
    model.gate.set()
    for thread in threads:
        thread.join()
    for _ in range(2):
        assert httpx.post(f"{url}/infer", json={"prompt": "x", "width": 65}).status_code == 422
    assert httpx.get(f"{url}/v1/jobs/no-such-job").status_code == 404
    codes = [results[i].status_code for i in range(10)]
    ok, full = codes.count(200), codes.count(503)
    # Admission guarantees three queue places, plus the running one once the worker has taken
    # the first job off the queue; whether it did before the burst ended is the loop's business.
    assert ok + full == 10
    assert ok in (3, 4)

    text = httpx.get(f"{url}/metrics").text
    requests = "hunyuan_http_requests_total"
    assert value(text, requests, method="POST", route="/infer", status="200") == ok
    assert value(text, requests, method="POST", route="/infer", status="503") == full
    assert value(text, requests, method="POST", route="/infer", status="422") == 2
    assert value(text, requests, method="GET", route="/v1/jobs/{job_id}", status="404") == 1
    assert value(text, "hunyuan_rejections_total", reason="queue_full") == full
    assert value(text, "hunyuan_client_errors_total", status="422", code="invalid_value") == 2
    assert value(text, "hunyuan_jobs_total", outcome="admitted") == ok
    assert value(text, "hunyuan_jobs_total", outcome="completed") == ok
    assert value(text, "hunyuan_jobs_final_total", status="succeeded", api="request") == ok
    assert value(text, "hunyuan_images_generated_total") == ok
    assert value(text, "hunyuan_inference_seconds_count") == ok
    assert value(text, "hunyuan_queue_wait_seconds_count") == ok
    assert value(text, "hunyuan_inference_seconds_bucket", le="+Inf") == ok
    for gauge, expected in (("queue_depth", 0), ("running_jobs", 0), ("busy", 0), ("ready", 1)):
        assert value(text, f"hunyuan_{gauge}") == expected, gauge
    info = [labels for (name, labels) in samples(text) if name == "hunyuan_model_info"]
    assert [dict(labels)["model_type"] for labels in info] == ["text2image"]
    assert dict(info[0])["model_id"] == "fake/model"
    # No raw path becomes a label: unknown routes share one series.
    httpx.get(f"{url}/nowhere/{'x' * 40}")
    text = httpx.get(f"{url}/metrics").text
    routes = {dict(labels)["route"] for (name, labels) in samples(text) if name == requests}
    assert "unmatched" in routes
    assert not any("nowhere" in route for route in routes)


def test_metrics_carry_the_standard_process_and_python_collectors(serve: Any) -> None:
    url = serve(FakeImageModel(steps=1, step_s=0.001))
    text = httpx.get(f"{url}/metrics").text
    found = samples(text)
    names = {name for name, _labels in found}
    assert value(text, "process_resident_memory_bytes") > 10 * 2**20
    assert value(text, "process_open_fds") >= 3
    assert value(text, "process_max_fds") > 0
    assert value(text, "process_start_time_seconds") > 1.7e9
    assert "process_cpu_seconds_total" in names
    assert "process_virtual_memory_bytes" in names
    python = [dict(labels) for name, labels in found if name == "python_info"]
    assert [info["version"] for info in python] == [platform.python_version()]
    for generation in ("0", "1", "2"):
        assert ("python_gc_collections_total", frozenset({("generation", generation)})) in found
        assert ("python_gc_objects_collected_total", frozenset({("generation", generation)})) in (
            found
        )
    # It describes this process (the live server runs in the test's own process).
    assert value(text, "process_start_time_seconds") == value(
        httpx.get(f"{url}/metrics").text, "process_start_time_seconds"
    )
    assert value(text, "process_virtual_memory_bytes") >= value(
        text, "process_resident_memory_bytes"
    )

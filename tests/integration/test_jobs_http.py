"""The async jobs API over real HTTP with fake models: submit, poll, stream, cancel, retention."""

from __future__ import annotations

import base64
import io
import threading
from typing import Any

import httpx
from PIL import Image

from tests.fakes import FakeImageModel
from tests.integration.live import (
    SMALL,
    counter,
    wait_until,
)
from tests.metrics import value
from tests.sse import parse_sse


def submit(url: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    # httpx.post opens and closes its own connection: the job outlives it by design.
    return httpx.post(f"{url}/v1/jobs", json=body, timeout=30, **kwargs)


def status(url: str, job_id: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30, **kwargs)


def wait_for_status(url: str, job_id: str, wanted: str) -> dict[str, Any]:
    wait_until(lambda: status(url, job_id).json()["status"] == wanted, timeout=30)
    return status(url, job_id).json()


def events_text(url: str, job_id: str, headers: dict[str, str] | None = None) -> str:
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=headers, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return "".join(r.iter_text())


def event_ids(text: str) -> list[int]:
    return [int(line[3:]) for line in text.splitlines() if line.startswith("id:")]


def final_count(url: str, status_value: str) -> int:
    text = httpx.get(f"{url}/metrics").text
    return int(value(text, "hunyuan_jobs_final_total", status=status_value, api="jobs"))


def test_result_is_fetched_after_the_submitting_connection_closed(serve: Any) -> None:
    model = FakeImageModel(steps=3, step_s=0.001)
    model.gate.clear()
    url = serve(model)
    response = submit(url, {"prompt": "fox", "seed": 5, **SMALL})
    assert response.status_code == 202
    body = response.json()
    job_id = body["id"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    assert body["status"] in ("queued", "running")
    assert len(job_id) >= 4 + 22  # "job_" plus at least 128 random bits in base64
    model.gate.set()  # the model runs only after the submitting connection has closed
    done = wait_for_status(url, job_id, "succeeded")
    result = done["result"]
    image = Image.open(io.BytesIO(base64.b64decode(result["image_base64"])))
    assert (image.format, image.size) == ("PNG", (64, 64))
    assert (result["width"], result["height"], result["seed"]) == (64, 64, 5)
    raw = status(url, job_id, headers={"Accept": "image/png"})
    assert raw.status_code == 200
    assert raw.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(raw.content)).size == (64, 64)
    assert status(url, job_id, headers={"Accept": "image/webp"}).status_code == 406
    assert final_count(url, "succeeded") == 1


def test_queued_job_reports_its_position_and_running_job_its_progress(serve: Any) -> None:
    model = FakeImageModel(steps=1000, step_s=0.01)
    model.gate.clear()
    url = serve(model)
    first = submit(url, {"prompt": "first", **SMALL}).json()["id"]
    second = submit(url, {"prompt": "second", **SMALL}).json()
    assert second["position"] >= 1
    model.gate.set()
    wait_until(lambda: "progress" in status(url, first).json())
    running = status(url, first).json()
    assert running["status"] == "running"
    assert running["progress"]["total"] == 1000
    queued = status(url, second["id"]).json()
    assert (queued["status"], queued["position"]) == ("queued", 1)
    for job_id in (first, second["id"]):
        httpx.delete(f"{url}/v1/jobs/{job_id}")


def test_events_replay_for_a_late_subscriber_and_resume_after_last_event_id(serve: Any) -> None:
    url = serve(FakeImageModel(steps=4, step_s=0.001))
    job_id = submit(url, {"prompt": "x", **SMALL}).json()["id"]
    wait_for_status(url, job_id, "succeeded")
    text = events_text(url, job_id)  # opened after the job ended: the whole history
    events = parse_sse(text)
    kinds = [name for name, _ in events]
    assert kinds == ["queued", "started", "progress", "progress", "progress", "progress", "result"]
    assert [data["step"] for name, data in events if name == "progress"] == [1, 2, 3, 4]
    ids = event_ids(text)
    assert ids == list(range(1, 8))
    result = events[-1][1]
    assert Image.open(io.BytesIO(base64.b64decode(result["image_base64"]))).size == (64, 64)
    resumed = events_text(url, job_id, headers={"Last-Event-ID": "4"})
    assert event_ids(resumed) == [5, 6, 7]
    assert [name for name, _ in parse_sse(resumed)] == ["progress", "progress", "result"]
    # A client that saw the end (or claims more) gets an empty stream that closes, not a hang.
    assert parse_sse(events_text(url, job_id, headers={"Last-Event-ID": "99"})) == []


def test_dropping_the_event_stream_does_not_cancel_the_job(serve: Any) -> None:
    model = FakeImageModel(steps=30, step_s=0.01)
    url = serve(model)
    job_id = submit(url, {"prompt": "keep going", **SMALL}).json()["id"]
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("event: progress"):
                break  # the client leaves mid-job
    done = wait_for_status(url, job_id, "succeeded")
    assert done["result"]["width"] == 64
    assert model.log.stopped_early == []
    assert model.log.steps_run == 30
    reopened = parse_sse(events_text(url, job_id))
    assert reopened[-1][0] == "result"


def test_delete_withdraws_a_queued_job_and_stops_a_running_one(serve: Any) -> None:
    model = FakeImageModel(steps=1000, step_s=0.01)
    url = serve(model)
    running = submit(url, {"prompt": "running", **SMALL}).json()["id"]
    queued = submit(url, {"prompt": "queued", **SMALL}).json()["id"]
    wait_until(lambda: model.log.steps_run >= 3)
    cancelled = httpx.delete(f"{url}/v1/jobs/{queued}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert counter(url, "cancelled_queued_cancelled_by_user") == 1
    stopped = httpx.delete(f"{url}/v1/jobs/{running}")
    assert stopped.json()["status"] == "cancelled"
    assert stopped.json()["error"]["code"] == "cancelled_by_user"
    steps_at_cancel = model.log.steps_run
    wait_until(lambda: counter(url, "cancelled_running_cancelled_by_user") == 1)
    assert model.log.steps_run <= steps_at_cancel + 1  # within one step
    assert model.log.stopped_early == ["running"]
    assert [call.prompt for call in model.calls] == ["running"]  # the queued one never ran
    assert final_count(url, "cancelled") == 2


def test_expired_and_unknown_ids_get_404s_that_say_which(serve: Any) -> None:
    url = serve(FakeImageModel(steps=1, step_s=0.001), job_result_ttl_s=0.3)
    unknown = status(url, "job_" + "A" * 24)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "job_not_found"
    assert "job_" + "A" * 24 in unknown.json()["error"]["message"]
    huge = status(url, "x" * 5000).json()["error"]  # named by its start and length, not echoed
    assert huge["code"] == "job_not_found"
    assert "x" * 32 + "... (5000 characters)" in huge["message"]
    assert len(huge["message"]) < 200
    job_id = submit(url, {"prompt": "short-lived", **SMALL}).json()["id"]
    wait_until(lambda: status(url, job_id).status_code == 404)
    expired = status(url, job_id).json()["error"]
    assert expired["code"] == "job_expired"
    assert "JOB_RESULT_TTL_S" in expired["message"]
    assert httpx.get(f"{url}/v1/jobs/{job_id}/events").status_code == 404


def test_store_cap_evicts_the_oldest_finished_job(serve: Any) -> None:
    url = serve(FakeImageModel(steps=1, step_s=0.001), max_stored_jobs=2)
    ids = []
    for i in range(3):
        ids.append(submit(url, {"prompt": f"p{i}", **SMALL}).json()["id"])
        wait_for_status(url, ids[-1], "succeeded")
    evicted = status(url, ids[0])
    assert evicted.status_code == 404
    assert evicted.json()["error"]["code"] == "job_evicted"
    assert "MAX_STORED_JOBS=2" in evicted.json()["error"]["message"]
    assert [status(url, job_id).status_code for job_id in ids[1:]] == [200, 200]
    metrics = httpx.get(f"{url}/metrics").text
    assert value(metrics, "hunyuan_stored_jobs_removed_total", reason="evicted") == 1


def test_full_queue_and_bad_bodies_are_refused_like_infer(serve: Any) -> None:
    model = FakeImageModel()
    model.gate.clear()
    url = serve(model, max_queue_size=1)
    submit(url, {"prompt": "a", **SMALL})
    wait_until(lambda: httpx.get(f"{url}/health").json()["busy"])
    submit(url, {"prompt": "b", **SMALL})
    full = submit(url, {"prompt": "c", **SMALL})
    assert full.status_code == 503
    assert int(full.headers["retry-after"]) >= 1
    assert full.json()["error"]["code"] == "queue_full"
    bad = submit(url, {"prompt": "x", "steps": 3})
    assert bad.status_code == 422
    assert "steps" in bad.json()["error"]["message"]
    no_webhooks = submit(url, {"prompt": "x", "webhook": "http://127.0.0.1:9/hook"})
    assert no_webhooks.status_code == 422
    assert "WEBHOOK_SECRET" in no_webhooks.json()["error"]["message"]
    model.gate.set()


def test_jobs_endpoints_need_the_api_key(serve: Any) -> None:
    url = serve(FakeImageModel(), api_key="s3cret")
    assert submit(url, {"prompt": "x", **SMALL}).status_code == 401
    assert status(url, "job_whatever").status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    job_id = submit(url, {"prompt": "x", **SMALL}, headers=auth).json()["id"]
    assert status(url, job_id).status_code == 401
    wait_until(lambda: status(url, job_id, headers=auth).json()["status"] == "succeeded")


def test_infer_refuses_the_jobs_only_webhook_field(serve: Any) -> None:
    url = serve(FakeImageModel())
    response = httpx.post(f"{url}/infer", json={"prompt": "x", "webhook": "http://a/", **SMALL})
    assert response.status_code == 422
    assert "webhook" in response.json()["error"]["message"]


def test_image2text_job_returns_the_infer_text_body(serve: Any) -> None:
    url = serve(FakeImageModel(steps=2, step_s=0.001), model_type="image2text")
    job_id = submit(url, {"prompt": "what is this?"}).json()["id"]
    done = wait_for_status(url, job_id, "succeeded")
    assert done["result"]["text"] == "fake answer"
    assert done["result"]["usage"]["total_tokens"] == 5
    assert status(url, job_id, headers={"Accept": "image/png"}).status_code == 406


def test_many_subscribers_each_get_the_whole_stream_of_one_run(serve: Any) -> None:
    """Five event streams on one job: each sees every event, and the model runs the job once."""
    model = FakeImageModel(steps=2, step_s=0.001)
    url = serve(model)
    job_id = submit(url, {"prompt": "once", **SMALL}).json()["id"]
    seen: list[list[str]] = []

    def subscribe() -> None:
        seen.append([name for name, _ in parse_sse(events_text(url, job_id))])

    threads = [threading.Thread(target=subscribe) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [["queued", "started", "progress", "progress", "result"]] * 5
    assert [call.prompt for call in model.calls] == ["once"]


def test_shutdown_drains_admitted_jobs_api_jobs() -> None:
    """The lifespan's drain runs jobs API jobs to the end, like any admitted request."""
    from hunyuan_service.api.app import create_app
    from tests.conftest import LiveServer
    from tests.fakes import fake_settings

    model = FakeImageModel(steps=20, step_s=0.01)
    model.gate.clear()
    app = create_app(fake_settings(shutdown_timeout_s=60), model=model)
    server = LiveServer(app).__enter__()
    ids = [submit(server.url, {"prompt": f"p{i}", **SMALL}).json()["id"] for i in range(3)]
    engine = app.state.engine
    handles = [engine.jobs.get(job_id).handle for job_id in ids]
    model.gate.set()
    server.__exit__()  # as on SIGTERM: stop accepting, drain, then stop the worker
    assert [handle.status.value for handle in handles] == ["succeeded"] * 3
    assert [call.prompt for call in model.calls] == ["p0", "p1", "p2"]
    assert model.log.stopped_early == []

"""The jobs API on a shared Redis store (JOB_STORE_URL): several replicas, one real redis-server.

Each replica is the real app on its own socket and event loop, with a fake model; the store is
a real `redis-server` on a free loopback port. A replica killed with SIGKILL needs a process of
its own: tests/e2e/test_shared_jobs.py.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from hunyuan_service.errors import JobCancelled
from hunyuan_service.models.base import JobContext
from tests.fakes import FakeImageModel
from tests.integration.live import SMALL, wait_until
from tests.integration.test_webhooks_http import WEBHOOK_SETTINGS, Listener
from tests.integration.test_webhooks_http import listener as listener  # the fixture
from tests.metrics import value
from tests.redis_server import RedisServer, needs_redis

pytestmark = needs_redis

PREFIX = "test:"


class GatedModel(FakeImageModel):
    """Every job waits at `gate` (cancellable meanwhile); prompts are logged as jobs start, in
    one list that all replicas of a test share (`started`) and in this replica's own (`ran`)."""

    def __init__(self, started: list[str], lock: threading.Lock, steps: int = 3) -> None:
        super().__init__(steps=steps, step_s=0.001)
        self.started, self.lock = started, lock
        self.ran: list[str] = []
        self.cancelled: list[str] = []
        self.gate.clear()

    def infer(self, request: Any, ctx: JobContext) -> Any:
        label = request.prompt if hasattr(request, "prompt") else request.messages[-1].text
        with self.lock:
            self.started.append(label)
            self.ran.append(label)
        while not self.gate.wait(0.005):
            try:
                ctx.raise_if_stopped()
            except JobCancelled:
                self.cancelled.append(label)
                raise
        return super(FakeImageModel, self).infer(request, ctx)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


class Fleet:
    """Replicas on one store; `add` starts one more, all sharing the start log."""

    def __init__(self, serve: Any, store: RedisServer) -> None:
        self.serve, self.store = serve, store
        self.started: list[str] = []
        self.lock = threading.Lock()
        self.models: list[GatedModel] = []

    def add(self, steps: int = 3, **settings: Any) -> str:
        model = GatedModel(self.started, self.lock, steps)
        self.models.append(model)
        options = {
            "job_store_url": self.store.url,
            "job_store_prefix": PREFIX,
            "job_store_heartbeat_s": 0.2,
            **settings,
        }
        return self.serve(model, **options)

    def open_gates(self) -> None:
        for model in self.models:
            model.gate.set()


@pytest.fixture
def fleet(serve: Any, redis_server: RedisServer) -> Iterator[Fleet]:
    replicas = Fleet(serve, redis_server)
    yield replicas
    replicas.open_gates()  # nothing left to wait for when the replicas drain


def submit(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/jobs", json=body, timeout=30)


def job(url: str, job_id: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30, **kwargs)


def wait_for(url: str, job_id: str, *statuses: str) -> dict[str, Any]:
    wait_until(lambda: job(url, job_id).json()["status"] in statuses, timeout=60)
    return job(url, job_id).json()


def events(url: str, job_id: str, after: int | None = None) -> list[dict[str, Any]]:
    headers = {} if after is None else {"Last-Event-ID": str(after)}
    with httpx.stream(
        "GET", f"{url}/v1/jobs/{job_id}/events", headers=headers, timeout=30
    ) as response:
        assert response.status_code == 200
        text = response.read().decode()
    frames = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            frames.append({**fields, "data": json.loads(fields["data"])})
    return frames


def test_a_job_posted_to_one_replica_is_read_through_every_other(fleet: Fleet) -> None:
    urls = [fleet.add(), fleet.add(), fleet.add()]
    fleet.open_gates()
    accepted = submit(urls[0], {"prompt": "shared", "width": 128, "height": 64})
    assert accepted.status_code == 202, accepted.text
    assert accepted.headers["location"] == f"/v1/jobs/{accepted.json()['id']}"
    job_id = accepted.json()["id"]
    for url in urls[1:]:
        body = wait_for(url, job_id, "succeeded")
        image = Image.open(io.BytesIO(base64.b64decode(body["result"]["image_base64"])))
        assert image.size == (128, 64)
        assert set(body["timings"]) == {"queue_ms", "inference_ms", "total_ms"}
        raw = job(url, job_id, headers={"Accept": "image/png"})
        assert raw.status_code == 200
        assert Image.open(io.BytesIO(raw.content)).size == (128, 64)
        assert job(url, job_id, headers={"Accept": "image/jpeg"}).status_code == 406
    replay = events(urls[1], job_id)
    kinds = [event["event"] for event in replay]
    assert kinds[:2] == ["queued", "started"]
    assert kinds[-1] == "result"
    assert kinds.count("progress") == 3
    assert [int(event["id"]) for event in replay] == list(range(1, len(replay) + 1))
    assert replay[-1]["data"]["width"] == 128
    resumed = events(urls[2], job_id, after=len(replay) - 2)
    assert [event["id"] for event in resumed] == [replay[-2]["id"], replay[-1]["id"]]
    assert [event["event"] for event in resumed] == ["progress", "result"]
    # A finished job's DELETE, from any replica, is a no-op that reports it.
    assert httpx.delete(f"{urls[2]}/v1/jobs/{job_id}").json()["status"] == "succeeded"
    unknown = job(urls[1], "job_unknown")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "job_not_found"
    huge = job(urls[1], "x" * 5000).json()["error"]  # named by its start and length, not echoed
    assert huge["code"] == "job_not_found"
    assert "x" * 32 + "... (5000 characters)" in huge["message"]
    assert len(huge["message"]) < 200


def test_delete_on_any_replica_stops_the_job_where_it_runs(fleet: Fleet) -> None:
    urls = [fleet.add(), fleet.add()]
    job_id = submit(urls[0], {"prompt": "long", **SMALL}).json()["id"]
    wait_until(lambda: fleet.started == ["long"], timeout=30)
    assert wait_for(urls[1], job_id, "running")["status"] == "running"
    runner = next(i for i, model in enumerate(fleet.models) if model.ran)
    other = urls[1 - runner]
    cancelled = httpx.delete(f"{other}/v1/jobs/{job_id}", timeout=30)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["error"]["code"] == "cancelled_by_user"
    # The replica running it sees the stop at its next step, after the DELETE has answered.
    wait_until(lambda: fleet.models[runner].cancelled == ["long"], timeout=30)
    assert events(other, job_id)[-1]["event"] == "error"
    # A queued job is withdrawn from the shared queue and never runs.
    second = submit(urls[0], {"prompt": "second", **SMALL}).json()["id"]
    third = submit(urls[1], {"prompt": "third", **SMALL}).json()["id"]
    fourth = submit(urls[0], {"prompt": "fourth", **SMALL}).json()["id"]
    wait_until(lambda: len(fleet.started) == 3, timeout=30)  # two run, "fourth" waits
    waiting = job(urls[1], fourth).json()
    assert (waiting["status"], waiting["position"]) == ("queued", 1)
    assert httpx.delete(f"{urls[1]}/v1/jobs/{fourth}").json()["status"] == "cancelled"
    fleet.open_gates()
    wait_for(urls[0], second, "succeeded")
    wait_for(urls[0], third, "succeeded")
    assert "fourth" not in fleet.started


def test_jobs_start_in_submission_order_across_the_fleet(fleet: Fleet) -> None:
    urls = [fleet.add(max_queue_size=8), fleet.add(max_queue_size=8)]
    prompts = [f"p{i}" for i in range(8)]
    ids = [submit(urls[i % 2], {"prompt": p, **SMALL}).json()["id"] for i, p in enumerate(prompts)]
    wait_until(lambda: len(fleet.started) == 2, timeout=30)
    fleet.open_gates()
    for job_id in ids:
        wait_for(urls[0], job_id, "succeeded")
    order = fleet.started
    assert sorted(order) == prompts
    for rank, prompt in enumerate(order):
        assert abs(rank - prompts.index(prompt)) < len(urls), order


def test_a_full_fleet_queue_is_a_503_with_retry_after(fleet: Fleet) -> None:
    urls = [fleet.add(max_queue_size=2), fleet.add(max_queue_size=2)]
    for prompt in ("a", "b"):
        assert submit(urls[0], {"prompt": prompt, **SMALL}).status_code == 202
    wait_until(lambda: len(fleet.started) == 2, timeout=30)  # both replicas busy
    for prompt in ("c", "d"):
        assert submit(urls[1], {"prompt": prompt, **SMALL}).status_code == 202
    full = submit(urls[0], {"prompt": "e", **SMALL})
    assert full.status_code == 503
    assert full.json()["error"]["code"] == "queue_full"
    assert int(full.headers["retry-after"]) >= 1
    assert "fleet" in full.json()["error"]["message"]
    # /infer does not count the fleet's queue: it runs on the replica that took it.
    fleet.open_gates()
    assert httpx.post(f"{urls[1]}/infer", json={"prompt": "sync", **SMALL}).status_code == 200


def test_results_survive_the_replica_that_ran_them(fleet: Fleet, serve: Any) -> None:
    first = fleet.add()
    fleet.open_gates()
    job_id = submit(first, {"prompt": "keep me", **SMALL}).json()["id"]
    wait_for(first, job_id, "succeeded")
    serve.stop(first)  # the replica's process ends: lifespan out, store closed
    later = fleet.add()
    body = job(later, job_id).json()
    assert body["status"] == "succeeded"
    assert body["result"]["width"] == SMALL["width"]


def test_the_store_going_away_and_coming_back(fleet: Fleet, redis_server: RedisServer) -> None:
    url = fleet.add()
    fleet.open_gates()
    assert httpx.get(f"{url}/ready").status_code == 200
    redis_server.stop()
    wait_until(lambda: httpx.get(f"{url}/ready").status_code == 503, timeout=30)
    health = httpx.get(f"{url}/health")
    assert health.status_code == 200
    assert health.json()["job_store"]["reachable"] is False
    refused = submit(url, {"prompt": "while away", **SMALL})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "job_store_unavailable"
    assert f"127.0.0.1:{redis_server.port}" in refused.json()["error"]["message"]
    assert "retry-after" in refused.headers
    assert httpx.post(f"{url}/infer", json={"prompt": "still", **SMALL}).status_code == 200
    redis_server.start()
    wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, timeout=30)
    job_id = submit(url, {"prompt": "after", **SMALL}).json()["id"]
    assert wait_for(url, job_id, "succeeded")["result"]["width"] == SMALL["width"]


def test_a_finished_job_expires_on_every_replica(fleet: Fleet) -> None:
    urls = [fleet.add(job_result_ttl_s=0.5), fleet.add(job_result_ttl_s=0.5)]
    fleet.open_gates()
    job_id = submit(urls[0], {"prompt": "brief", **SMALL}).json()["id"]
    # Only a finished job expires; with a TTL this short, polling for its success could miss it.
    wait_until(lambda: job(urls[1], job_id).status_code == 404, timeout=30)
    for url in urls:
        gone = job(url, job_id)
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "job_expired"


def test_one_webhook_sequence_per_job_whichever_replica_runs_it(
    fleet: Fleet, listener: Listener
) -> None:
    urls = [fleet.add(**WEBHOOK_SETTINGS) for _ in range(3)]
    fleet.open_gates()
    ids = [
        submit(urls[i % 3], {"prompt": f"w{i}", "webhook": listener.url, **SMALL}).json()["id"]
        for i in range(6)
    ]
    for job_id in ids:
        wait_for(urls[0], job_id, "succeeded")
    wait_until(lambda: len(listener.received) >= 6, timeout=30)
    attempts = [
        value(httpx.get(f"{url}/metrics").text, "hunyuan_webhooks_total", outcome="attempted")
        for url in urls
    ]
    assert sum(attempts) == 6
    delivered = sorted(json.loads(body)["id"] for _headers, body in listener.received)
    assert delivered == sorted(ids)


def test_the_password_in_the_url_is_never_shown(
    serve: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cret-pa55word"
    store = RedisServer(tmp_path, password=secret).start()
    try:
        fleet = Fleet(serve, store)
        url = fleet.add()
        fleet.open_gates()
        health = httpx.get(f"{url}/health").text
        assert secret not in health
        assert ":***@127.0.0.1" in health
        job_id = submit(url, {"prompt": "private", **SMALL}).json()["id"]
        wait_for(url, job_id, "succeeded")
        store.stop()
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 503, timeout=30)
        refused = submit(url, {"prompt": "x", **SMALL}).text
        assert secret not in refused
        assert "***" in refused
        assert secret not in httpx.get(f"{url}/ready").text
    finally:
        store.stop()
    assert secret not in caplog.text


def test_a_dead_replicas_claimed_job_is_run_by_another(
    fleet: Fleet, redis_server: RedisServer
) -> None:
    """A replica that claimed a job and died before starting it: its lease lapses and the job
    goes back to the head of the queue (the claim is made here by hand, as a replica would)."""
    client = redis_server.client()
    url = fleet.add()
    blocker = submit(url, {"prompt": "blocker", **SMALL}).json()["id"]
    wait_until(lambda: fleet.started == ["blocker"], timeout=30)
    orphan = submit(url, {"prompt": "orphan", **SMALL}).json()["id"]
    moved = client.lmove(f"{PREFIX}queue", f"{PREFIX}claimed:r_dead", "LEFT", "RIGHT")
    assert moved.decode() == orphan
    client.hset(f"{PREFIX}job:{orphan}", "owner", "r_dead")
    client.sadd(f"{PREFIX}replicas", "r_dead")  # and no lease: reaped at the next heartbeat
    wait_until(lambda: not client.sismember(f"{PREFIX}replicas", "r_dead"), timeout=30)
    assert job(url, orphan).json()["position"] == 1
    fleet.open_gates()
    wait_for(url, blocker, "succeeded")
    assert wait_for(url, orphan, "succeeded")["status"] == "succeeded"
    assert fleet.started == ["blocker", "orphan"]


def test_two_deployments_share_one_redis_under_their_prefixes(
    fleet: Fleet, redis_server: RedisServer
) -> None:
    ours = fleet.add()
    theirs = fleet.add(job_store_prefix="other-deployment:")
    fleet.open_gates()
    mine = submit(ours, {"prompt": "ours", **SMALL}).json()["id"]
    other = submit(theirs, {"prompt": "theirs", **SMALL}).json()["id"]
    wait_for(ours, mine, "succeeded")
    wait_for(theirs, other, "succeeded")
    assert job(theirs, mine).json()["error"]["code"] == "job_not_found"
    assert job(ours, other).json()["error"]["code"] == "job_not_found"
    keys = {key.decode() for key in redis_server.client().keys("*")}
    assert keys
    assert all(key.startswith((PREFIX, "other-deployment:")) for key in keys), keys


def test_an_uploaded_image_job_runs_on_another_replica(fleet: Fleet) -> None:
    """A multipart image2text job is stored as sent and decoded again where it runs."""
    busy = fleet.add(model_type="image2text")
    runner = fleet.add(model_type="image2text")
    blocker = submit(busy, {"prompt": "hold"}).json()["id"]
    wait_until(lambda: fleet.started == ["hold"], timeout=30)
    holder = 0 if fleet.models[0].ran else 1
    picture = io.BytesIO()
    Image.new("RGB", (96, 80), (200, 10, 10)).save(picture, format="PNG")
    accepted = httpx.post(
        f"{[busy, runner][holder]}/v1/jobs",
        data={"prompt": "what is this?"},
        files={"images": ("red.png", picture.getvalue(), "image/png")},
        timeout=30,
    )
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    fleet.models[1 - holder].gate.set()
    done = wait_for(busy, job_id, "succeeded")
    assert done["result"]["text"] == "fake answer"
    (call,) = fleet.models[1 - holder].calls
    assert [image.size for image in call.messages[-1].images] == [(96, 80)]
    fleet.open_gates()
    wait_for(runner, blocker, "succeeded")

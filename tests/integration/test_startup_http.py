"""Start-up that tells the truth: the service answers while the model loads and warms up, says
what it is doing on /health, refuses work until ready, and reports a failed load in one line."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from fastapi.testclient import TestClient

from hunyuan_service.api.app import create_app
from hunyuan_service.errors import ModelLoadError
from tests.fakes import SlowStartModel, fake_settings


def until(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    """Waits for a condition the service will reach; fails only if it never does."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def test_health_reports_each_start_up_phase_and_ready_waits_for_the_end() -> None:
    model = SlowStartModel(fake_settings(warmup=["64x64"]))
    app = create_app(model.settings, model, load_in_background=True)
    with TestClient(app) as client:
        assert model.loading.wait(60)
        health = client.get("/health")
        assert health.status_code == 200
        assert (health.json()["state"], health.json()["phase"]) == ("loading", "loading model")
        assert client.get("/ready").status_code == 503
        refused = client.post("/infer", json={"prompt": "x"})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"

        model.load_release.set()
        assert model.warming.wait(60)
        until(lambda: client.get("/health").json()["phase"] == "warming up 64x64")
        assert client.get("/ready").status_code == 503

        model.warm_release.set()
        until(lambda: client.get("/ready").status_code == 200)
        assert client.get("/health").json()["state"] == "ready"
        assert "phase" not in client.get("/health").json()


def test_a_failed_background_load_stops_the_server_once_and_says_why_in_one_line() -> None:
    failed = threading.Event()
    calls: list[int] = []
    model = SlowStartModel(fail=ModelLoadError("DEVICE=cuda but no CUDA device is available"))
    model.load_release.set()

    def on_failed() -> None:
        calls.append(1)
        failed.set()

    app = create_app(model.settings, model, load_in_background=True, on_start_failed=on_failed)
    with TestClient(app) as client:
        assert failed.wait(60)
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["state"] == "failed"
        assert health.json()["error"] == "DEVICE=cuda but no CUDA device is available"
        assert client.get("/ready").status_code == 503
    assert calls == [1]


def test_stopping_while_loading_never_turns_ready() -> None:
    model = SlowStartModel()
    app = create_app(model.settings, model, load_in_background=True)
    with TestClient(app):
        assert model.loading.wait(60)
    # The lifespan ended while load() was still blocked; letting it finish changes nothing.
    engine = app.state.engine
    model.load_release.set()
    until(lambda: model.loaded)
    assert engine.state.value == "stopped"
    assert not engine.worker_alive


def test_health_shows_what_load_reports_while_downloading() -> None:
    model = SlowStartModel()
    original_load = model.load

    def downloading_load() -> None:
        model.report("downloading someorg/model: 3 files, 1.25 GiB so far")
        original_load()

    model.load = downloading_load  # type: ignore[method-assign]
    app = create_app(model.settings, model, load_in_background=True)
    with TestClient(app) as client:
        assert model.loading.wait(60)
        body = client.get("/health").json()
        assert body["state"] == "loading"
        assert body["phase"] == "downloading someorg/model: 3 files, 1.25 GiB so far"
        model.load_release.set()
        until(lambda: client.get("/ready").status_code == 200)

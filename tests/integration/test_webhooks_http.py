"""Webhooks of the jobs API: signed per Standard Webhooks, retried, and never sent off the list."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.fakes import FakeImageModel
from tests.integration.live import (
    SMALL,
    wait_until,
)
from tests.metrics import value

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Listener(ThreadingHTTPServer):
    """A loopback receiver that records every connection and request; answers from `statuses`."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.connections = 0
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.paths: list[str] = []
        self.times: list[float] = []  # when each POST arrived (monotonic)
        self.answer = threading.Event()  # cleared: hold each POST without answering
        self.answer.set()
        super().__init__(("127.0.0.1", 0), _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.connections += 1
        return True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class _Handler(BaseHTTPRequestHandler):
    server: Listener

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.server.times.append(time.monotonic())
        self.server.paths.append(self.path)
        self.server.received.append((dict(self.headers.items()), body))
        self.server.answer.wait(60)
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("location", "/elsewhere")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener(statuses=[])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.answer.set()
    server.shutdown()
    server.server_close()


WEBHOOK_SETTINGS = {
    "webhook_secret": SECRET,
    "allowed_webhook_domains": ["127.0.0.1"],
    "allow_private_webhook_addresses": True,
}


def test_webhook_is_called_once_with_a_valid_signature(
    serve: Any,
    listener: Listener,
) -> None:
    url = serve(FakeImageModel(steps=2, step_s=0.001), **WEBHOOK_SETTINGS)
    response = httpx.post(
        f"{url}/v1/jobs", json={"prompt": "hook me", "webhook": listener.url, **SMALL}
    )
    assert response.status_code == 202
    job_id = response.json()["id"]
    wait_until(lambda: len(listener.received) == 1)
    headers, body = listener.received[0]
    payload = Webhook(SECRET).verify(body, headers)  # raises on a bad signature
    assert payload["id"] == job_id
    assert payload["status"] == "succeeded"
    assert payload["result"]["width"] == 64
    assert json.loads(body) == payload
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 32).verify(body, headers)


def test_a_failing_webhook_is_retried_and_never_touches_the_job(
    serve: Any,
    listener: Listener,
) -> None:
    listener.statuses[:] = [500, 503]
    url = serve(FakeImageModel(steps=1, step_s=0.001), webhook_max_attempts=3, **WEBHOOK_SETTINGS)
    job_id = httpx.post(
        f"{url}/v1/jobs", json={"prompt": "retry", "webhook": listener.url, **SMALL}
    ).json()["id"]
    wait_until(lambda: len(listener.received) == 3)
    ids = {headers["webhook-id"] for headers, _ in listener.received}
    assert len(ids) == 1  # the same message, retried: receivers deduplicate on webhook-id
    assert httpx.get(f"{url}/v1/jobs/{job_id}").json()["status"] == "succeeded"
    assert httpx.post(f"{url}/infer", json={"prompt": "after", **SMALL}).status_code == 200


def test_a_host_off_the_allowlist_is_refused_and_never_contacted(
    serve: Any,
    listener: Listener,
) -> None:
    url = serve(FakeImageModel(), **WEBHOOK_SETTINGS)
    port = listener.server_address[1]
    for hook in (f"http://localhost:{port}/hook", f"http://169.254.169.254:{port}/", "ftp://x/"):
        refused = httpx.post(f"{url}/v1/jobs", json={"prompt": "x", "webhook": hook, **SMALL})
        assert refused.status_code == 422
        assert refused.json()["error"]["param"] == "webhook"
    assert listener.connections == 0


def test_an_allowed_host_on_a_private_address_is_never_contacted(
    serve: Any,
    listener: Listener,
) -> None:
    settings = {**WEBHOOK_SETTINGS, "allow_private_webhook_addresses": False}
    url = serve(FakeImageModel(steps=1, step_s=0.001), webhook_max_attempts=1, **settings)
    job_id = httpx.post(
        f"{url}/v1/jobs", json={"prompt": "x", "webhook": listener.url, **SMALL}
    ).json()["id"]
    wait_until(lambda: httpx.get(f"{url}/v1/jobs/{job_id}").json()["status"] == "succeeded")
    wait_until(lambda: webhooks_given_up(url) == 1)
    assert listener.connections == 0


def webhooks_given_up(url: str) -> int:
    return webhook_count(url, "given_up")


def webhook_count(url: str, outcome: str) -> int:
    return int(value(httpx.get(f"{url}/metrics").text, "hunyuan_webhooks_total", outcome=outcome))


def submit(url: str, listener: Listener, **body: Any) -> str:
    response = httpx.post(
        f"{url}/v1/jobs", json={"prompt": "x", "webhook": listener.url, **SMALL, **body}
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_a_webhook_is_given_up_after_the_last_attempt_with_growing_backoff(
    serve: Any, listener: Listener
) -> None:
    listener.statuses[:] = [500] * 10
    url = serve(FakeImageModel(steps=1, step_s=0.001), webhook_max_attempts=3, **WEBHOOK_SETTINGS)
    submit(url, listener)
    wait_until(lambda: webhooks_given_up(url) == 1, timeout=60)
    # Given up: the sequence has ended, so no fourth attempt can still come.
    assert len(listener.received) == 3
    assert webhook_count(url, "attempted") == 3
    assert webhook_count(url, "delivered") == 0
    first, second, third = listener.times
    assert second - first >= 0.5  # BACKOFF_BASE_S, then doubled: lower bounds only
    assert third - second >= 1.0


def test_a_receiver_that_never_answers_is_cut_off_by_the_timeout(
    serve: Any, listener: Listener
) -> None:
    listener.answer.clear()  # holds every POST until the test ends
    url = serve(
        FakeImageModel(steps=1, step_s=0.001),
        webhook_max_attempts=2,
        webhook_timeout_s=0.2,
        **WEBHOOK_SETTINGS,
    )
    submit(url, listener)
    # Without WEBHOOK_TIMEOUT_S the first attempt would wait for as long as the receiver holds.
    wait_until(lambda: webhooks_given_up(url) == 1, timeout=60)
    assert len(listener.received) == 2


def test_a_redirect_is_not_followed(serve: Any, listener: Listener) -> None:
    listener.statuses[:] = [307]
    url = serve(FakeImageModel(steps=1, step_s=0.001), webhook_max_attempts=1, **WEBHOOK_SETTINGS)
    submit(url, listener)
    wait_until(lambda: webhooks_given_up(url) == 1, timeout=60)
    assert listener.paths == ["/hook"]  # never "/elsewhere"


@pytest.mark.parametrize("ending", ["failed", "cancelled", "expired"])
def test_jobs_that_end_without_a_result_call_their_webhook_too(
    serve: Any, listener: Listener, ending: str
) -> None:
    model = FakeImageModel(steps=1, step_s=0.001)
    if ending != "failed":
        model.gate.clear()  # the job waits to run until the test ends it
    url = serve(model, **WEBHOOK_SETTINGS)
    body: dict[str, Any] = {"prompt": "boom"} if ending == "failed" else {}
    if ending == "expired":
        body["timeout_s"] = 0.2
    job_id = submit(url, listener, **body)
    if ending == "cancelled":
        assert httpx.delete(f"{url}/v1/jobs/{job_id}").status_code == 200
    wait_until(lambda: len(listener.received) == 1, timeout=60)
    model.gate.set()
    headers, raw = listener.received[0]
    payload = Webhook(SECRET).verify(raw, headers)
    assert (payload["id"], payload["status"]) == (job_id, ending)
    expected_code = {"failed": "internal_error", "cancelled": "cancelled_by_user"}
    expected_code["expired"] = "deadline_exceeded"
    assert payload["error"]["code"] == expected_code[ending]
    assert "result" not in payload or payload["result"] is None

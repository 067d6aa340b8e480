"""Webhooks of the jobs API: signed per Standard Webhooks, retried, and never sent off the list."""

from __future__ import annotations

import json
import threading
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
        self.server.received.append((dict(self.headers.items()), body))
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        self.send_response(status)
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
    return int(
        value(httpx.get(f"{url}/metrics").text, "hunyuan_webhooks_total", outcome="given_up")
    )

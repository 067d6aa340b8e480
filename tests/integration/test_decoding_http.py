"""The decoding phase of image2text: the request's deadline and its client's disconnect apply to
it, the pool stops before the next image, and /health reports a pool task that never ends."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import httpx
import pytest

from hunyuan_service.api.app import create_app
from tests.conftest import LiveServer
from tests.fakes import FakeImageModel, fake_settings
from tests.integration.live import wait_until
from tests.metrics import value
from tests.recording import RecordingServer


@pytest.fixture
def held() -> Iterator[RecordingServer]:
    """Image URLs under /held/ that answer only when the test sets `release`."""
    server = RecordingServer()
    server.release.clear()
    yield server
    server.release.set()
    server.server.shutdown()
    server.server.server_close()


class Service(NamedTuple):
    url: str
    engine: Any


@pytest.fixture
def service() -> Iterator[Service]:
    settings = fake_settings(
        model_type="image2text",
        allowed_media_domains=["127.0.0.1"],
        allow_private_media_addresses=True,
        media_fetch_timeout_s=60,  # longer than the test: only the request's deadline can end it
    )
    model = FakeImageModel()
    model.model_type = "image2text"  # type: ignore[misc]
    app = create_app(settings, model)
    with LiveServer(app) as server:
        yield Service(server.url, app.state.engine)


def pool(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/health").json()["cpu_pool"]


def ask(url: str, held: RecordingServer, **extra: Any) -> httpx.Response:
    images = [held.url("/held/a.png"), held.url("/held/b.png")]
    body = {"prompt": "x", "images": images, **extra}
    return httpx.post(f"{url}/infer", json=body, timeout=60)


def test_the_deadline_ends_decoding_and_the_next_image_is_never_fetched(
    service: Service, held: RecordingServer
) -> None:
    reply = ask(service.url, held, timeout_s=0.5)
    assert reply.status_code == 504
    assert "not decoded within the request's deadline (0.5 s)" in reply.json()["error"]["message"]
    assert httpx.get(f"{service.url}/health").json()["queue_depth"] == 0
    held.release.set()
    wait_until(lambda: pool(service.url)["busy"] == 0, timeout=60)
    # The pool stopped before the second image (on a very slow machine the deadline may even
    # pass before the first fetch began).
    assert held.paths in (["/held/a.png"], [])


def test_a_client_that_leaves_ends_decoding(service: Service, held: RecordingServer) -> None:
    body = json.dumps(
        {"prompt": "x", "images": [held.url("/held/a.png"), held.url("/held/b.png")]}
    ).encode()
    port = int(service.url.rsplit(":", 1)[1])
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(
        b"POST /infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    wait_until(lambda: held.paths == ["/held/a.png"], timeout=60)  # decoding has begun
    client.close()  # the client leaves while the first image is still being fetched
    answered = "hunyuan_http_requests_total"

    def dropped() -> float:
        text = httpx.get(f"{service.url}/metrics").text
        return value(text, answered, method="POST", route="/infer", status="499")

    wait_until(lambda: dropped() == 1, timeout=60)
    held.release.set()
    wait_until(lambda: pool(service.url)["busy"] == 0, timeout=60)
    assert held.paths == ["/held/a.png"]  # the pool stopped before the second image


def test_health_reports_a_wedged_pool(service: Service, held: RecordingServer) -> None:
    service.engine.cpu_task_wedged_s = 0.2  # the default is 90 s plus two whole fetches
    worker = threading.Thread(target=ask, args=(service.url, held))
    worker.start()
    wait_until(lambda: httpx.get(f"{service.url}/health").status_code == 503, timeout=60)
    body = httpx.get(f"{service.url}/health").json()
    assert body["cpu_pool"]["wedged"] is True
    assert body["cpu_pool"]["busy"] == 1
    assert httpx.get(f"{service.url}/ready").status_code == 503
    held.release.set()
    worker.join()
    wait_until(lambda: httpx.get(f"{service.url}/health").status_code == 200, timeout=60)

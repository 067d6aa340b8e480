"""Slow-header clients against the command's uvicorn protocol: a header deadline, and connections
waiting for their headers neither counting towards LIMIT_CONCURRENCY nor piling up without bound."""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from hunyuan_service.api.app import create_app
from hunyuan_service.api.slow_clients import REQUEST_TIMEOUT, HeaderGuard
from tests.conftest import LiveServer
from tests.fakes import FakeImageModel, fake_settings
from tests.integration.live import wait_until
from tests.metrics import value

HEADERS = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\n\r\n"


@pytest.fixture
def guarded() -> Iterator[Any]:
    """`guarded(**settings)` serves the app as the command does and returns (url, port, guard,
    the connections uvicorn counts towards LIMIT_CONCURRENCY)."""
    servers: list[LiveServer] = []

    def start(evict_after_s: float = 1.0, **settings: Any) -> tuple[str, int, HeaderGuard, Any]:
        app = create_app(fake_settings(**settings), model=FakeImageModel(steps=1, step_s=0))
        guard: HeaderGuard = app.state.header_guard
        guard.evict_after_s = evict_after_s
        server = LiveServer(
            app, http=guard.protocol_class(), limit_concurrency=settings["limit_concurrency"]
        ).__enter__()
        servers.append(server)
        return server.url, server.port, guard, server.server.server_state.connections

    yield start
    for server in servers:
        server.__exit__()


def read_response(connection: socket.socket) -> bytes:
    """One whole response with a Content-Length, and nothing after it."""
    connection.settimeout(120)
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += connection.recv(length - len(body))
    return head + b"\r\n\r\n" + body


def read_to_end(connection: socket.socket) -> bytes:
    connection.settimeout(120)  # only a hang fails here
    data = b""
    while chunk := connection.recv(4096):
        data += chunk
    return data


def test_headers_sent_a_byte_at_a_time_get_a_408_and_the_connection_closes(guarded: Any) -> None:
    _url, port, guard, _counted = guarded(header_timeout_s=0.5, limit_concurrency=8)
    closed = threading.Event()
    with socket.create_connection(("127.0.0.1", port)) as connection:

        def trickle() -> None:
            # One byte per 50 ms of headers that never end, until the server has answered.
            for byte in itertools.chain(HEADERS[:-4], itertools.cycle(b"X-Slow: 1\r\n")):
                if closed.wait(0.05):
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return

        sender = threading.Thread(target=trickle)
        sender.start()
        answer = read_to_end(connection)
        closed.set()
        sender.join(timeout=60)
    assert answer == REQUEST_TIMEOUT
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert guard.closed["header_timeout"] == 1
    assert guard.waiting == {}


def test_a_kept_alive_connection_gets_the_deadline_for_its_next_request(guarded: Any) -> None:
    _url, port, guard, _counted = guarded(header_timeout_s=0.5, limit_concurrency=8)
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(HEADERS)
        assert read_response(connection).startswith(b"HTTP/1.1 200 OK")
        connection.sendall(HEADERS[:10])  # the next request begins, and stalls
        assert read_to_end(connection) == REQUEST_TIMEOUT
    assert guard.closed["header_timeout"] == 1


def test_a_kept_alive_connections_next_requests_count_and_wait_for_nothing(guarded: Any) -> None:
    _url, port, guard, counted = guarded(header_timeout_s=600, limit_concurrency=8)
    with socket.create_connection(("127.0.0.1", port)) as connection:
        for _ in range(3):
            # Each request arrives whole with its first bytes: no header deadline is armed for
            # it, and its connection counts towards LIMIT_CONCURRENCY from its headers on (the
            # server counted it before it answered).
            connection.sendall(HEADERS)
            assert read_response(connection).startswith(b"HTTP/1.1 200 OK")
            assert len(counted) == 1
            assert guard.waiting == {}


def test_hundreds_of_stalled_connections_neither_block_requests_nor_pile_up(guarded: Any) -> None:
    url, port, guard, _counted = guarded(evict_after_s=0, header_timeout_s=600, limit_concurrency=8)
    stalled = []
    try:
        for _ in range(300):
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(HEADERS[:20])  # and nothing more, for the rest of the test
            stalled.append(connection)
        # At most LIMIT_CONCURRENCY of them wait; each newer one closed the longest waiting.
        # (Read from this thread while the server's loop runs, both counts must be waited for:
        # an eviction is counted a moment before the newcomer joins the waiting ones.)
        wait_until(
            lambda: guard.closed["evicted"] == 300 - 8 and len(guard.waiting) == 8, timeout=120
        )
        # None of them counts towards LIMIT_CONCURRENCY=8: real requests are served, not 503.
        with httpx.Client(timeout=120) as client:
            for _ in range(3):
                assert client.get(f"{url}/health").status_code == 200
        evicted = [c for c in stalled[:10] if read_to_end(c) == REQUEST_TIMEOUT]
        assert len(evicted) == 10  # the oldest went first
        # A new connection, the client's here too, closes the one that has waited longest
        # whenever eight wait.
        metrics = httpx.get(f"{url}/metrics", timeout=120).text
        reported = value(metrics, "hunyuan_slow_connections_closed_total", reason="evicted")
        assert reported == guard.closed["evicted"] > 300 - 8
        assert len(guard.waiting) <= 8
    finally:
        for connection in stalled:
            connection.close()


def test_a_request_whose_headers_arrived_counts_towards_limit_concurrency(guarded: Any) -> None:
    url, port, _guard, _counted = guarded(
        header_timeout_s=600, limit_concurrency=8, body_timeout_s=600
    )
    waiting_bodies = []
    try:
        # Eight requests whose headers arrived and whose bodies never come: they are requests,
        # and they fill LIMIT_CONCURRENCY.
        for _ in range(8):
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(
                b"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            waiting_bodies.append(connection)

        def refused() -> bool:
            return httpx.get(f"{url}/health", timeout=120).status_code == 503

        wait_until(refused, timeout=120)
    finally:
        for connection in waiting_bodies:
            connection.close()
    wait_until(lambda: httpx.get(f"{url}/health", timeout=120).status_code == 200, timeout=120)


def test_connections_waiting_for_headers_leave_room_for_requests(guarded: Any) -> None:
    url, port, guard, counted = guarded(
        evict_after_s=0, header_timeout_s=600, limit_concurrency=8, body_timeout_s=600
    )
    opened = []
    try:
        # Two requests in progress (headers in, body withheld) count towards the limit of 8 ...
        for _ in range(2):
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(
                b"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"
            )
            opened.append(connection)
        wait_until(lambda: len(counted) == 2 and not guard.waiting, timeout=120)  # requests now
        # ... and eight connections stalled in their headers fill the waiting room.
        for _ in range(8):
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(HEADERS[:20])
            opened.append(connection)
        wait_until(lambda: len(guard.waiting) == 8, timeout=120)
        # A new request takes the longest-waiting one's place: 7 stalled and 2 requests are 9
        # connections, over the limit if the stalled ones counted. They don't.
        assert httpx.get(f"{url}/health", timeout=120).status_code == 200
        assert guard.closed["evicted"] == 1
    finally:
        for connection in opened:
            connection.close()


def test_a_burst_of_new_connections_is_not_mistaken_for_slow_ones(guarded: Any) -> None:
    # A generous evict_after_s (the service's is 1 s), so that a loaded machine cannot make a
    # connection of the burst wait that long; with 0, this test fails: the burst is evicted.
    url, port, guard, _counted = guarded(
        evict_after_s=10, header_timeout_s=600, limit_concurrency=100
    )
    guard.max_waiting = 8
    # Forty connections opened at once: the server accepts them before it reads any of their
    # bytes, so more than eight wait for headers for a moment.
    burst = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        for connection in burst:
            connection.sendall(HEADERS)
        answers = [read_response(connection) for connection in burst]
    finally:
        for connection in burst:
            connection.close()
    assert all(answer.startswith(b"HTTP/1.1 200 OK") for answer in answers)
    assert guard.closed["evicted"] == 0
    assert httpx.get(f"{url}/health", timeout=120).status_code == 200

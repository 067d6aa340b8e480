"""A deadline for request headers on uvicorn's HTTP/1.1 connections, against slow-header clients.

uvicorn bounds idle keep-alive connections but not a request whose line and headers trickle in
(slowloris): such a connection was held as long as the client liked, and it counted towards
LIMIT_CONCURRENCY, so a few hundred of them made uvicorn answer every real request with a 503.
The protocol made here changes three things, per connection, at no cost to a normal request:

- A connection waiting for its request line and headers (a new one, or a kept-alive one once
  the next request's first byte arrives) gets HEADER_TIMEOUT_S for them; then it is answered
  408 and closed.
- While it waits it does not count towards LIMIT_CONCURRENCY; it counts from its headers on.
- At most LIMIT_CONCURRENCY connections wait for headers at once; a new one beyond that closes
  the one that has waited longest, if that one has waited a second (a client sending normally
  never waits that long, so under attack the slow ones go first, and a burst of new
  connections, accepted before any of their bytes are read, is never mistaken for one).
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hunyuan_service.settings import Settings

_BODY = b"the request line and headers did not arrive in time\n"
REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_BODY), _BODY)
)

LINGER_S = 1.0  # how long a connection answered 408 stays half-closed before it is closed


class HeaderGuard:
    """The state every connection of one server shares: the limits, the connections waiting for
    headers (oldest first), and how many were closed and why (for /metrics).

    Args:
        timeout_s: the time a connection has for its request line and headers; 0 turns the
            guard off (uvicorn's own protocol is used).
        max_waiting: connections that may wait for headers at once, unless all of them have
            waited less than `evict_after_s` (a normal client sends its headers in
            milliseconds).
    """

    def __init__(self, timeout_s: float, max_waiting: int, evict_after_s: float = 1.0) -> None:
        self.timeout_s = timeout_s
        self.max_waiting = max_waiting
        self.evict_after_s = evict_after_s
        # Connection -> its deadline. Every wait is `timeout_s` long, so insertion order is
        # deadline order: one timer, for the oldest, serves them all (a timer per connection
        # cost measurably more per request).
        self.waiting: dict[Any, float] = {}
        self.closed: collections.Counter[str] = collections.Counter()
        self._sweep: asyncio.TimerHandle | None = None

    def wait(self, connection: Any, loop: asyncio.AbstractEventLoop) -> None:
        """Starts `connection`'s wait for headers. When `max_waiting` wait already, the longest
        waiting one is closed, if it has waited `evict_after_s`: a burst of connections is
        accepted before their first bytes are read, and none of those may be taken for slow."""
        if len(self.waiting) >= self.max_waiting:
            oldest, deadline = next(iter(self.waiting.items()))
            if deadline - self.timeout_s <= loop.time() - self.evict_after_s:
                oldest.close_slow("evicted")
        self.waiting[connection] = loop.time() + self.timeout_s
        if self._sweep is None:
            self._sweep = loop.call_at(self.waiting[connection], self._close_late, loop)

    def _close_late(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep = None
        now = loop.time()
        while self.waiting:
            connection, deadline = next(iter(self.waiting.items()))
            if deadline > now:
                self._sweep = loop.call_at(deadline, self._close_late, loop)
                return
            connection.close_slow("header_timeout")

    @classmethod
    def from_settings(cls, settings: Settings) -> HeaderGuard:
        return cls(settings.header_timeout_s, settings.limit_concurrency)

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def protocol_class(self) -> type[asyncio.Protocol]:
        """uvicorn's h11 protocol with this guard; what `uvicorn.Config(http=...)` takes."""
        return _guarded_h11(self)


def _guarded_h11(guard: HeaderGuard) -> type[asyncio.Protocol]:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        # A kept-alive connection between two requests: uvicorn's keep-alive timeout bounds it
        # until the next request's first byte arrives.
        between_requests = False
        answered_slow = False  # given its 408: only closing remains

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._wait_for_headers()

        def data_received(self, data: bytes) -> None:
            if self.answered_slow:  # what a closed-off client still sends is read and dropped
                return
            # The next request on a kept-alive connection has begun: until its headers are in,
            # the connection does not count towards LIMIT_CONCURRENCY, like a new one. Most
            # arrive whole with these bytes, so the deadline is armed only if they did not.
            starting, self.between_requests = self.between_requests, False
            if starting:
                self.connections.discard(self)
            super().data_received(data)  # starts the request once its headers are in
            if self.conn.their_state is h11.IDLE:  # they are not (yet)
                if starting:
                    self._wait_for_headers()
            elif starting or self in guard.waiting:
                self._headers_arrived()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.between_requests = True

        def connection_lost(self, exc: Exception | None) -> None:
            guard.waiting.pop(self, None)
            super().connection_lost(exc)

        def _wait_for_headers(self) -> None:
            if self in guard.waiting or self.transport.is_closing():
                return
            # Not a connection uvicorn counts for LIMIT_CONCURRENCY until its headers arrive.
            self.connections.discard(self)
            guard.wait(self, self.loop)

        def _headers_arrived(self) -> None:
            guard.waiting.pop(self, None)
            self.connections.add(self)

        def close_slow(self, reason: str) -> None:
            """Answers 408 and closes: the headers took too long, or it waited longest."""
            guard.waiting.pop(self, None)
            if self.transport.is_closing() or self.answered_slow:
                return
            guard.closed[reason] += 1
            self.answered_slow = True
            self.transport.write(REQUEST_TIMEOUT)
            # Half-close first: closing a socket whose client data is still unread resets it,
            # and the reset can destroy the 408 on its way. The rest is read and dropped.
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

    return HeaderDeadlineProtocol

"""A loopback HTTP server for image-fetching tests: it serves a PNG, redirects, and records."""

from __future__ import annotations

import http.server
import threading
import time
from typing import Any

from tests.images import png_bytes


class RecordingServer:
    """A loopback HTTP server that serves a PNG, redirects, and records every request it gets.

    `/held/<name>` serves the PNG only once `release` is set (it starts set).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.paths: list[str] = []
        self.hosts: list[str] = []  # the Host header of each request
        self.release = threading.Event()
        self.release.set()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.paths.append(self.path)
                owner.hosts.append(self.headers.get("Host", ""))
                if self.path.startswith("/held/"):
                    owner.release.wait(60)
                if self.path == "/red.png" or self.path.startswith("/held/"):
                    data = png_bytes()
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                elif self.path.startswith("/redirect-to/"):
                    self.send_response(302)
                    self.send_header("Location", self.path.removeprefix("/redirect-to/"))
                    self.end_headers()
                elif self.path == "/huge.png":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()  # no length: the service must count while streaming
                    for _ in range(100):
                        self.wfile.write(b"\0" * 65536)
                elif self.path == "/slow.png":
                    self.send_response(200)
                    self.end_headers()
                    time.sleep(5)
                else:
                    self.send_response(404)
                    self.end_headers()

            def log_message(self, *_args: Any) -> None:
                return

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

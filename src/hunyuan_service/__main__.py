"""The `hunyuan-service` command: validate settings, serve with uvicorn, drain on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hunyuan_service.settings import Settings

logger = logging.getLogger("hunyuan_service")


# Exit codes, documented in the README.
EXIT_BAD_SETTINGS = 2
EXIT_START_FAILED = 3
EXIT_CANNOT_LISTEN = 4
# After the drain, how long uvicorn waits for the last responses to be written: every job has
# ended by then, so what remains is writing small bodies. The drain, this and the webhooks'
# grace stay under SHUTDOWN_TIMEOUT_S + 10 s, the stop timeout the README asks for.
RESPONSE_GRACE_S = 3
DUPLICATE_SIGNAL_S = 1.0  # a repeat within this is the same Ctrl+C delivered twice
EXIT_INTERRUPTED = 130  # Ctrl+C before the server was up; afterwards a stop is a clean exit 0
EXIT_CODES = (
    "0 stopped after a drain; 2 bad settings or arguments; 3 the model could not load; "
    "4 the port is taken; 130 interrupted during start-up"
)


def parser() -> argparse.ArgumentParser:
    """The command line: `serve` (the default) or `download`; everything else is a setting."""
    from hunyuan_service import __version__
    from hunyuan_service.settings import settings_help

    epilog = f"{settings_help()}\n\nexit codes: {EXIT_CODES}"
    formatter = argparse.RawDescriptionHelpFormatter
    main_parser = argparse.ArgumentParser(
        prog="hunyuan-service",
        description="Serves one generative model on one GPU over HTTP (FLUX text2image or "
        "Qwen2.5-VL image2text). Settings come from the environment, not from flags.",
        epilog=epilog,
        formatter_class=formatter,
    )
    main_parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = main_parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "serve",
        help="load the model and serve HTTP until SIGTERM (the default)",
        description="Loads MODEL_ID and serves it over HTTP; SIGTERM drains, then exits 0.",
        epilog=epilog,
        formatter_class=formatter,
    )
    commands.add_parser(
        "download",
        help="fetch MODEL_ID (and the adapters of LORAS) into the Hugging Face cache, then exit",
        description="Fetches MODEL_ID, and the hub adapters of LORAS, into the Hugging Face "
        "cache (HF_HOME), prints where, and exits; the service can then start offline "
        "(HF_HUB_OFFLINE=1).",
        epilog=epilog,
        formatter_class=formatter,
    )
    return main_parser


def main() -> int:
    """Starts the service; exits with one line and a documented code when it cannot."""
    try:
        command = parser().parse_args(sys.argv[1:]).command
    except SystemExit as done:  # --help, --version, or a usage error (exit 2)
        return done.code if isinstance(done.code, int) else EXIT_BAD_SETTINGS
    try:
        code = download() if command == "download" else serve()
    except KeyboardInterrupt:
        sys.stderr.write("hunyuan-service: interrupted during start-up\n")
        code = EXIT_INTERRUPTED
    if "torch" in sys.modules:
        # The service has drained and shut down in order. Tearing down the interpreter with
        # torch, diffusers and transformers loaded took another 3 s (1.4 s with nothing but
        # the imports), which counts against `docker stop`'s and Kubernetes' grace periods.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def download() -> int:
    """`hunyuan-service download`: fetches MODEL_ID (and the hub adapters of LORAS) into the
    Hugging Face cache and exits, so an image, an init container or an offline host
    (`HF_HUB_OFFLINE=1`) can be prepared ahead."""
    from hunyuan_service.models.loading import describe_load_error, download_checkpoint
    from hunyuan_service.models.lora import download_adapters

    settings = read_settings()
    if settings is None:
        return EXIT_BAD_SETTINGS
    try:
        folder = download_checkpoint(settings)
        adapters = download_adapters(settings)
    except Exception as error:
        reason = describe_load_error(error, settings)
        if reason is None:
            raise
        sys.stderr.write(f"hunyuan-service: cannot download: {reason}\n")
        return EXIT_START_FAILED
    sys.stdout.write(f"{settings.model_id} is in {folder}\n")
    for name, where in adapters:
        sys.stdout.write(f"LoRA {name} is in {where}\n")
    return 0


def read_settings() -> Settings | None:
    """The settings, or None after writing the one line that names each bad variable."""
    # Imported here, so that Ctrl+C during these slow imports is caught by `main`.
    from pydantic import ValidationError

    from hunyuan_service.settings import Settings, describe_settings_error

    try:
        return Settings()
    except ValidationError as error:
        sys.stderr.write(f"hunyuan-service: {describe_settings_error(error)}\n")
        return None


def serve() -> int:
    from hunyuan_service.engine.lifecycle import State

    settings = read_settings()
    if settings is None:
        return EXIT_BAD_SETTINGS
    # Take the port before anything slow, so a busy port fails at once, not after the load.
    try:
        listener = listen(settings.host, settings.port)
    except OSError as error:
        reason = error.strerror or str(error)
        sys.stderr.write(
            f"hunyuan-service: cannot listen on {settings.host}:{settings.port}: {reason}; "
            "stop what uses it or set PORT\n"
        )
        return EXIT_CANNOT_LISTEN

    import uvicorn

    from hunyuan_service.api.app import create_app
    from hunyuan_service.logs import configure_logging

    configure_logging(settings.log_level)
    logger.info("listening on http://%s:%d (pid %d)", settings.host, settings.port, os.getpid())
    servers: list[uvicorn.Server] = []

    def stop_after_failed_start() -> None:
        for server in servers:
            server.should_exit = True

    app = create_app(settings, load_in_background=True, on_start_failed=stop_after_failed_start)
    engine = app.state.engine

    class DrainingServer(uvicorn.Server):
        """Drains on a stop signal, and only then lets uvicorn shut down.

        The first SIGTERM or SIGINT starts the engine's drain: the server keeps listening, so new
        requests and `/ready` get a 503 with `Retry-After` rather than a refused connection,
        while admitted jobs finish. Jobs still running SHUTDOWN_TIMEOUT_S later end with a 503
        `shutdown`. Then uvicorn closes the listener and waits RESPONSE_GRACE_S at most for the
        last responses to be written. Unlike uvicorn's own handler it does not re-raise the
        signal afterwards, so a completed drain exits 0.
        """

        first_signal_at: float | None = None
        drain_task: asyncio.Task[None] | None = None

        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Only a second, later Ctrl+C forces an exit. One Ctrl+C under `uv run` arrives
            # twice within milliseconds (from the terminal, and forwarded by uv), and so does
            # SIGTERM from `pkill -f`; both must still drain.
            now = time.monotonic()
            if self.first_signal_at is None:
                self.first_signal_at = now
                engine.begin_drain()
                self.loop.call_soon_threadsafe(self._start_drain)
            elif sig == signal.SIGINT and now - self.first_signal_at > DUPLICATE_SIGNAL_S:
                self.force_exit = True
                self.should_exit = True

        def _start_drain(self) -> None:
            self.drain_task = asyncio.ensure_future(self._drain_then_exit())

        async def _drain_then_exit(self) -> None:
            try:
                await engine.drain()
            finally:
                self.should_exit = True

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=RESPONSE_GRACE_S,
        limit_concurrency=settings.limit_concurrency,
        lifespan="on",
        # Slow-header clients (api/slow_clients.py); HEADER_TIMEOUT_S=0 keeps uvicorn's own.
        http=app.state.header_guard.protocol_class() if app.state.header_guard.enabled else "h11",
    )
    server = DrainingServer(config)
    servers.append(server)
    server.run(sockets=[listener])
    # uvicorn has put the default handlers back; `uv run` forwards the terminal's Ctrl+C a
    # moment later, which would now raise KeyboardInterrupt during interpreter exit (exit 130
    # and an "Exception ignored in atexit" traceback). The service has stopped: ignore it.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)
    if not server.started or engine.state is State.FAILED:
        return EXIT_START_FAILED
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn to serve on; raises OSError when the address is taken."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError:
        listener.close()
        raise
    return listener


if __name__ == "__main__":
    sys.exit(main())

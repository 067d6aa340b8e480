"""The `hunyuan-service` command: validate settings, serve with uvicorn, drain on SIGTERM."""

from __future__ import annotations

import logging
import math
import signal
import sys
from types import FrameType

from pydantic import ValidationError

from hunyuan_service.settings import Settings, describe_settings_error

logger = logging.getLogger("hunyuan_service")


def main() -> int:
    """Starts the service; exits 2 with a one-line message on a bad setting."""
    try:
        settings = Settings()
    except ValidationError as error:
        sys.stderr.write(f"hunyuan-service: {describe_settings_error(error)}\n")
        return 2

    import uvicorn

    from hunyuan_service.api.app import create_app
    from hunyuan_service.logs import configure_logging

    configure_logging(settings.log_level)
    app = create_app(settings)
    engine = app.state.engine

    class DrainingServer(uvicorn.Server):
        """Marks the service as draining the moment a stop signal arrives.

        uvicorn then stops accepting connections and waits for in-flight responses (bounded by
        SHUTDOWN_TIMEOUT_S) before the lifespan stops the worker. Unlike uvicorn's own handler
        it does not re-raise the signal afterwards, so a completed drain exits 0.
        """

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            engine.begin_drain()
            # Only a second Ctrl+C forces an exit. SIGTERM often arrives twice (`uv run`
            # forwards it to its child, and `pkill -f` signals both), and must still drain.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s) or None,
        lifespan="on",
    )
    server = DrainingServer(config)
    server.run()
    if not server.started:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

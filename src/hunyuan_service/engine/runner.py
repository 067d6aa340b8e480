"""The one long-lived thread that runs model calls, handing results back to the event loop.

`asyncio.to_thread` costs a thread-pool hop and a context copy per call; between one job and the
next that was a measurable share of the per-request overhead. A single thread also means the
model is only ever touched from one OS thread, which keeps thread-local state (CUDA streams,
grad mode) the same for every job.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_Call = tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]


class ModelThread:
    """Runs one call at a time on a dedicated daemon thread; `run` awaits its result."""

    def __init__(self, name: str = "hunyuan-model") -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._calls.put((future, function, args))
        return await future

    async def stop(self) -> None:
        """Lets the thread end after its current call; a call still running is not waited for."""
        if self._thread.is_alive():
            self._calls.put(None)

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            future, function, args = call
            loop = future.get_loop()
            try:
                result = function(*args)
            except BaseException as error:  # handed to the awaiting task, which decides
                outcome: tuple[Any, BaseException | None] = (None, error)
            else:
                outcome = (result, None)
            try:
                loop.call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:  # the loop has closed: nobody waits any more
                logger.debug("model call finished after the event loop closed")


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting task was cancelled (shutdown)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

"""Counts torch.compile compilations in this process, so /metrics can show any after /ready.

torch keeps one registry of compile callbacks per process, so the count is the process's: one
model per process, as the service runs. Importing this module imports no torch; `install` hooks
the counter once torch is in use.
"""

from __future__ import annotations

import threading
from typing import Any


class _Counter:
    def __init__(self) -> None:
        self.count = 0
        self._installed = False
        self._lock = threading.Lock()

    def install(self) -> None:
        """Registers with torch._dynamo (idempotent); call where torch is already imported."""
        with self._lock:
            if self._installed:
                return
            from torch._dynamo.callback import on_compile_start

            on_compile_start(self._started)
            self._installed = True

    def _started(self, _args: Any = None) -> None:
        with self._lock:
            self.count += 1


COMPILATIONS = _Counter()


def install() -> None:
    COMPILATIONS.install()


def compilations() -> int:
    """Frames torch.compile has compiled in this process since `install`."""
    return COMPILATIONS.count

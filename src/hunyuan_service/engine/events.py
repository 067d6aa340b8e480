"""What can happen to a job, as small typed events: queued, started, progress, token, the end.

Every job keeps its events in order; a renderer (JSON, SSE, OpenAI chunks, the jobs API) reads
them through its `JobHandle` and writes them in its own wire format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hunyuan_service.errors import ServiceError


@dataclass(frozen=True)
class Queued:
    """The job waits; `position` 1 is next to run. Sent on admission and whenever it moves."""

    position: int
    kind = "queued"

    def data(self) -> dict[str, Any]:
        return {"position": self.position}


@dataclass(frozen=True)
class Started:
    kind = "started"

    def data(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Progress:
    """A denoising step finished: `step` of `total` (1-based)."""

    step: int
    total: int
    kind = "progress"

    def data(self) -> dict[str, Any]:
        return {"step": self.step, "total": self.total}


@dataclass(frozen=True)
class Token:
    """New generated text; the pieces of a job's tokens add up to its result's text."""

    text: str
    kind = "token"

    def data(self) -> dict[str, Any]:
        return {"text": self.text}


@dataclass(frozen=True)
class Succeeded:
    """The last event of a job that produced its output."""

    output: Any
    kind = "result"


@dataclass(frozen=True)
class Failed:
    """The last event of a job that ended without output: an error, a cancel or its deadline."""

    error: ServiceError
    kind = "error"


Event = Queued | Started | Progress | Token | Succeeded | Failed


@dataclass(frozen=True)
class Heartbeat:
    """Not a job event: what `JobHandle.events` yields when nothing happened for a while."""

    kind = "keepalive"

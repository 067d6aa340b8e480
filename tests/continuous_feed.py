"""A feed for driving the continuous decoder directly from a test, without the engine."""

from __future__ import annotations

from typing import Any

from hunyuan_service.models.base import JobContext
from hunyuan_service.models.types import Image2TextInput


class ListFeed:
    """A feed that hands over its jobs at once and records each outcome (model-level tests)."""

    def __init__(self, jobs: list[tuple[Any, Image2TextInput, JobContext]]) -> None:
        self.jobs = list(jobs)
        self.outcomes: dict[Any, Any] = {}
        self.order: list[Any] = []

    def take(self) -> list[tuple[Any, Image2TextInput, JobContext]]:
        taken, self.jobs = self.jobs, []
        return taken

    def close_if_idle(self) -> bool:
        return not self.jobs

    def finished(self, key: Any, outcome: Any) -> None:
        self.outcomes[key] = outcome
        self.order.append(key)


def run_together(model: Any, requests: dict[str, Image2TextInput], contexts: dict | None = None):
    contexts = contexts or {}
    feed = ListFeed([(k, r, contexts.get(k, JobContext())) for k, r in requests.items()])
    model.serve_continuously(feed)
    return feed

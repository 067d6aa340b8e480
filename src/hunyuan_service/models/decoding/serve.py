"""The model thread's side of a continuous-batching session: take, admit, step, report."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hunyuan_service.errors import JobCancelled
from hunyuan_service.models.decoding.batch import DecodeBatch, Prepared
from hunyuan_service.models.decoding.rows import Row

logger = logging.getLogger(__name__)


@dataclass
class Waiting:
    """A job handed over but not decoding yet; `prepared` once it was templated and tokenized."""

    key: Any
    request: Any
    ctx: Any
    prepared: Prepared | None = None


def serve_rows(
    batch: DecodeBatch,
    feed: Any,
    is_out_of_memory: Callable[[BaseException], bool],
    recover: Callable[[], None],
) -> None:
    """Runs until the feed has nothing more: jobs join between steps, oldest first, as soon as
    their KV range is free; each ends and is reported on its own. While rows decode, at most one
    job joins between two steps, so a burst of arrivals delays the running rows by one prefill
    a step, not by all of them. A failure of one job's preparation or prefill fails that job
    only; a failed step fails the rows in it."""
    waiting: collections.deque[Waiting] = collections.deque()
    while True:
        waiting.extend(Waiting(key, request, ctx) for key, request, ctx in feed.take())
        _admit(batch, waiting, feed, is_out_of_memory, recover, limit=1 if batch.rows else None)
        for row in batch.stopped():
            _leave(batch, row, feed)
        if not batch.rows:
            if not waiting and feed.close_if_idle():
                return
            continue
        try:
            ended = batch.step()
        except Exception as error:
            if is_out_of_memory(error):
                recover()
            logger.exception("a decode step failed; its %d rows fail", len(batch.rows))
            for row in list(batch.rows):
                batch.free(row)
                feed.finished(row.key, error)
            continue
        for row in ended:
            _leave(batch, row, feed)


def _admit(
    batch: DecodeBatch,
    waiting: collections.deque[Waiting],
    feed: Any,
    is_out_of_memory: Callable[[BaseException], bool],
    recover: Callable[[], None],
    limit: int | None,
) -> None:
    """Prepares and prefills waiting jobs in order, up to `limit` (None: all that fit); one
    whose range does not fit yet keeps its place, and those behind it wait too (first come,
    first served)."""
    admitted = 0
    while waiting and (limit is None or admitted < limit):
        head = waiting[0]
        if head.ctx.should_stop():
            waiting.popleft()
            reason = head.ctx.stop_reason()
            feed.finished(head.key, JobCancelled(f"job stopped: {reason}", code=reason))
            continue
        try:
            if head.prepared is None:
                head.prepared = batch.prepare(head.request, head.ctx, head.key)
            if not batch.fits(head.prepared):
                waiting.popleft()
                feed.finished(head.key, batch.too_big(head.prepared))
                continue
            row = batch.admit(head.prepared)
        except Exception as error:
            waiting.popleft()
            if is_out_of_memory(error):
                recover()
            feed.finished(head.key, error)
            continue
        if row is None:
            return
        waiting.popleft()
        admitted += 1
        if row.ended is not None:  # its first token was its last
            _leave(batch, row, feed)


def _leave(batch: DecodeBatch, row: Row, feed: Any) -> None:
    batch.free(row)
    outcome = row.cancelled() if row.ctx.should_stop() else row.output(batch.decode)
    feed.finished(row.key, outcome)

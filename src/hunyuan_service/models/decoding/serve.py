"""The model thread's side of a continuous-batching session: take, admit, step, report."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

from hunyuan_service.errors import JobCancelled
from hunyuan_service.models.decoding.batch import DecodeBatch, Prepared
from hunyuan_service.models.decoding.rows import Row

logger = logging.getLogger(__name__)


def serve_rows(
    batch: DecodeBatch,
    feed: Any,
    is_out_of_memory: Callable[[BaseException], bool],
    recover: Callable[[], None],
) -> None:
    """Runs until the feed has nothing more: jobs join between steps, oldest first, as soon as
    their KV range is free; each ends and is reported on its own. A failure of one row's
    preparation or prefill fails that row only; a failed step fails the rows in it."""
    waiting: collections.deque[Prepared] = collections.deque()
    while True:
        for key, request, ctx in feed.take():
            try:
                prepared = batch.prepare(request, ctx, key)
            except Exception as error:
                feed.finished(key, error)
                continue
            if batch.fits(prepared):
                waiting.append(prepared)
            else:
                feed.finished(key, batch.too_big(prepared))
        _admit(batch, waiting, feed, is_out_of_memory, recover)
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
    waiting: collections.deque[Prepared],
    feed: Any,
    is_out_of_memory: Callable[[BaseException], bool],
    recover: Callable[[], None],
) -> None:
    """Prefills waiting requests in order while their ranges fit; one that does not fit yet
    keeps its place, and those behind it wait too (first come, first served)."""
    while waiting:
        head = waiting[0]
        if head.ctx.should_stop():
            waiting.popleft()
            reason = head.ctx.stop_reason()
            feed.finished(head.key, JobCancelled(f"job stopped: {reason}", code=reason))
            continue
        try:
            row = batch.admit(head)
        except Exception as error:
            waiting.popleft()
            if is_out_of_memory(error):
                recover()
            feed.finished(head.key, error)
            continue
        if row is None:
            return
        waiting.popleft()
        if row.ended is not None:  # its first token was its last
            _leave(batch, row, feed)


def _leave(batch: DecodeBatch, row: Row, feed: Any) -> None:
    batch.free(row)
    outcome = row.cancelled() if row.ctx.should_stop() else row.output(batch.decode)
    feed.finished(row.key, outcome)

"""The model thread's side of a continuous-batching session: take, admit, step, report."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hunyuan_service.errors import JobCancelled
from hunyuan_service.models.decoding.batch import DecodeBatch, Prefill, Prepared
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
    their KV range is free; each ends and is reported on its own. One job prefills at a time,
    `batch.chunk_tokens` of its prompt between two decode steps, so a joining job delays the
    running rows by one chunk a step. A failure of one job's preparation or prefill fails that
    job only; a failed step fails the rows in it."""
    waiting: collections.deque[Waiting] = collections.deque()
    prefill: Prefill | None = None
    while True:
        waiting.extend(Waiting(key, request, ctx) for key, request, ctx in feed.take())
        if prefill is None:
            prefill = _begin_next(batch, waiting, feed, is_out_of_memory, recover)
        if prefill is not None:
            prefill = _advance(batch, prefill, feed, is_out_of_memory, recover)
        for row in batch.stopped():
            _leave(batch, row, feed)
        if not batch.rows:
            if prefill is None and not waiting and feed.close_if_idle():
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


def _begin_next(
    batch: DecodeBatch,
    waiting: collections.deque[Waiting],
    feed: Any,
    is_out_of_memory: Callable[[BaseException], bool],
    recover: Callable[[], None],
) -> Prefill | None:
    """Starts the prefill of the oldest waiting job whose range is free, preparing it first;
    one that does not fit yet keeps its place, and those behind it wait too (first come, first
    served)."""
    while waiting:
        head = waiting[0]
        if head.ctx.should_stop():
            waiting.popleft()
            feed.finished(head.key, _stopped(head.ctx))
            continue
        try:
            if head.prepared is None:
                head.prepared = batch.prepare(head.request, head.ctx, head.key)
            if not batch.fits(head.prepared):
                waiting.popleft()
                feed.finished(head.key, batch.too_big(head.prepared))
                continue
            prefill = batch.begin(head.prepared)
        except Exception as error:
            waiting.popleft()
            if is_out_of_memory(error):
                recover()
            feed.finished(head.key, error)
            continue
        if prefill is not None:
            waiting.popleft()
        return prefill
    return None


def _advance(
    batch: DecodeBatch,
    prefill: Prefill,
    feed: Any,
    is_out_of_memory: Callable[[BaseException], bool],
    recover: Callable[[], None],
) -> Prefill | None:
    """Runs one chunk of the prefill; returns it while chunks remain, else None."""
    if prefill.ctx.should_stop():
        batch.drop(prefill)
        feed.finished(prefill.key, _stopped(prefill.ctx))
        return None
    try:
        row = batch.advance(prefill)
    except Exception as error:  # `advance` gave its range back
        if is_out_of_memory(error):
            recover()
        feed.finished(prefill.key, error)
        return None
    if row is None:
        return prefill
    if row.ended is not None:  # its first token was its last
        _leave(batch, row, feed)
    return None


def _stopped(ctx: Any) -> JobCancelled:
    reason = ctx.stop_reason()
    return JobCancelled(f"job stopped: {reason}", code=reason)


def _leave(batch: DecodeBatch, row: Row, feed: Any) -> None:
    batch.free(row)
    outcome = row.cancelled() if row.ctx.should_stop() else row.output(batch.decode)
    feed.finished(row.key, outcome)

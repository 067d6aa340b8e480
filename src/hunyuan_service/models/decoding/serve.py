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
    their KV range is free; each ends and is reported on its own. Between two decode steps runs
    at most about one chunk of vision encoding (`batch.turn_budget`) and one chunk of prefill:
    `batch.chunk_tokens` of one long prompt, or several short prompts whole (padded, within the
    same tokens), so joining jobs delay the running rows by about two chunks a step at most. A
    failure of one job's preparation fails that job only, a failed prefill the jobs in it, and a
    failed step the rows in it."""
    waiting: collections.deque[Waiting] = collections.deque()
    prefills: list[Prefill] = []
    while True:
        waiting.extend(Waiting(key, request, ctx) for key, request, ctx in feed.take())
        if not prefills:
            prefills = _begin_next(batch, waiting, feed, is_out_of_memory, recover)
        if prefills:
            prefills = _advance(batch, prefills, feed, is_out_of_memory, recover)
        for row in batch.stopped():
            _leave(batch, row, feed)
        if not batch.rows:
            if not prefills and not waiting and feed.close_if_idle():
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
) -> list[Prefill]:
    """Starts the prefill of the oldest waiting job whose range is free, preparing it and
    encoding its images first, and of the jobs behind it while their prompts fit one chunk
    together with it; a job that does not fit yet, or whose images take more than this turn's
    encoding budget, keeps its place (its encoding goes on next turn), and those behind it wait
    too (first come, first served)."""
    group: list[Prefill] = []
    budget = batch.turn_budget()
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
            lengths = [p.prepared.prompt_tokens for p in group] + [head.prepared.prompt_tokens]
            if group and not batch.fits_together(lengths):
                return group
            if not batch.encode(head.prepared, budget):
                return group
            prefill = batch.begin(head.prepared)
        except Exception as error:
            waiting.popleft()
            if is_out_of_memory(error):
                recover()
            feed.finished(head.key, error)
            continue
        if prefill is None:
            return group
        waiting.popleft()
        group.append(prefill)
        if not batch.fits_together(lengths):  # a long prompt runs alone, a chunk at a time
            return group
    return group


def _advance(
    batch: DecodeBatch,
    prefills: list[Prefill],
    feed: Any,
    is_out_of_memory: Callable[[BaseException], bool],
    recover: Callable[[], None],
) -> list[Prefill]:
    """Runs one chunk of prefill: the next chunk of one prompt, or several prompts whole.
    Returns the prefill still unfinished, if any."""
    going = []
    for prefill in prefills:
        if prefill.ctx.should_stop():
            batch.drop(prefill)
            feed.finished(prefill.key, _stopped(prefill.ctx))
        else:
            going.append(prefill)
    if not going:
        return []
    try:
        if len(going) == 1:
            row = batch.advance(going[0])
            if row is None:
                return going
            rows = [row]
        else:
            rows = batch.advance_together(going)
    except Exception as error:  # the prefills' ranges were given back
        if is_out_of_memory(error):
            recover()
        for prefill in going:
            feed.finished(prefill.key, error)
        return []
    for row in rows:
        if row.ended is not None:  # its first token was its last
            _leave(batch, row, feed)
    return []


def _stopped(ctx: Any) -> JobCancelled:
    reason = ctx.stop_reason()
    return JobCancelled(f"job stopped: {reason}", code=reason)


def _leave(batch: DecodeBatch, row: Row, feed: Any) -> None:
    batch.free(row)
    outcome = row.cancelled() if row.ctx.should_stop() else row.output(batch.decode)
    feed.finished(row.key, outcome)

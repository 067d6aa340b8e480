"""Prometheus exposition: job counters, latency histograms and gauges, written by hand.

The format is a few lines of text; a client library would add a dependency and a global
registry for what fits in this file.
"""

from __future__ import annotations

import bisect
import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hunyuan_service.engine.scheduler import Scheduler
    from hunyuan_service.engine.store import JobStore


class Histogram:
    """Cumulative bucket counts for Prometheus; observed on the event loop only."""

    SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

    def __init__(self, buckets: tuple[float, ...] = SECONDS) -> None:
        self.buckets = buckets
        self._hits = [0] * (len(self.buckets) + 1)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        self._hits[bisect.bisect_left(self.buckets, value)] += 1

    @property
    def counts(self) -> list[int]:
        """Cumulative counts per bucket bound, as Prometheus wants them."""
        return list(itertools.accumulate(self._hits[:-1]))


def render_prometheus(
    scheduler: Scheduler | None,
    store: JobStore,
    *,
    ready: bool,
    webhooks: dict[str, int] | None = None,
    client_errors: dict[tuple[int, str], int] | None = None,
) -> str:
    lines = ["# HELP hunyuan_jobs_total Jobs by outcome.", "# TYPE hunyuan_jobs_total counter"]
    counters = dict(scheduler.counters) if scheduler else {}
    for outcome, count in sorted(counters.items()):
        lines.append(f'hunyuan_jobs_total{{outcome="{outcome}"}} {count}')
    lines += [
        "# HELP hunyuan_jobs_final_total Jobs by final status; api=jobs for POST /v1/jobs.",
        "# TYPE hunyuan_jobs_final_total counter",
    ]
    finals = dict(scheduler.final_statuses) if scheduler else {}
    for (status, detached), count in sorted(finals.items()):
        api = "jobs" if detached else "request"
        lines.append(f'hunyuan_jobs_final_total{{status="{status}",api="{api}"}} {count}')
    lines += [
        "# HELP hunyuan_webhooks_total Webhook POSTs attempted; webhooks delivered or given up.",
        "# TYPE hunyuan_webhooks_total counter",
    ]
    for outcome, count in sorted((webhooks or {}).items()):
        lines.append(f'hunyuan_webhooks_total{{outcome="{outcome}"}} {count}')
    lines += [
        "# HELP hunyuan_client_errors_total Requests answered 4xx, by status and error code.",
        "# TYPE hunyuan_client_errors_total counter",
    ]
    for (http_status, code), count in sorted((client_errors or {}).items()):
        lines.append(f'hunyuan_client_errors_total{{status="{http_status}",code="{code}"}} {count}')
    lines += [
        "# HELP hunyuan_stored_jobs_removed_total Jobs API jobs dropped: expired or evicted.",
        "# TYPE hunyuan_stored_jobs_removed_total counter",
    ]
    for reason in ("evicted", "expired"):
        lines.append(
            f'hunyuan_stored_jobs_removed_total{{reason="{reason}"}} {store.evictions[reason]}'
        )
    gauges = {
        "hunyuan_queue_depth": (scheduler.queue_depth if scheduler else 0, "Jobs waiting."),
        "hunyuan_busy": (int(scheduler.busy) if scheduler else 0, "1 while a job runs."),
        "hunyuan_ready": (int(ready), "1 while accepting requests."),
        "hunyuan_stored_jobs": (len(store), "Jobs API jobs kept in memory."),
        "hunyuan_stored_job_bytes": (store.bytes, "Bytes of stored jobs API results."),
    }
    for name, (value, help_text) in gauges.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
    if scheduler is not None:
        histograms = {
            "hunyuan_inference_seconds": (scheduler.inference_seconds, "Run time of jobs done."),
            "hunyuan_queue_wait_seconds": (scheduler.queue_wait_seconds, "Wait before a run."),
            "hunyuan_batch_size": (scheduler.batch_sizes, "Jobs run together in one model call."),
        }
        for name, (histogram, help_text) in histograms.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
            for bound, count in zip(histogram.buckets, histogram.counts, strict=True):
                lines.append(f'{name}_bucket{{le="{bound:g}"}} {count}')
            lines += [
                f'{name}_bucket{{le="+Inf"}} {histogram.total}',
                f"{name}_sum {histogram.sum:.6f}",
                f"{name}_count {histogram.total}",
            ]
    return "\n".join(lines) + "\n"

"""bench/replicas.py's jobs workload, shortened: three service processes on one real Redis job
store behind nginx, one of them SIGKILLed while it runs a job.

The outcomes are asserted; the throughput ratio and the time the lost job took to be reaped are
speeds, which the bench reports and a test on a loaded CI machine must not depend on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e.test_replicas import behaviour_checks, run_bench
from tests.redis_server import needs_redis

pytestmark = [
    pytest.mark.slow,
    needs_redis,
    pytest.mark.skipif(
        shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
        reason="needs nginx (apt-get install nginx-light; .ci/run installs it)",
    ),
]
SPEEDS = ("jobs: three replicas faster than one", "jobs: ...within the lease bound")


def test_jobs_survive_a_sigkilled_replica(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "--jobs", "45", "--job-s", "0.05")
    behaviour = behaviour_checks(result, SPEEDS)
    assert len(behaviour) == 7
    assert behaviour == dict.fromkeys(behaviour, True), result
    assert result["killed_replica_running"] >= 1
    assert result["finals"]["failed"] == len(result["replica_lost"])
    assert result["succeeded"] + len(result["replica_lost"]) == 45

"""bench/replicas.py's jobs workload, shortened: three service processes on one real Redis job
store behind nginx, one of them SIGKILLed while it runs a job.

The outcomes are asserted; the throughput ratio and the time the lost job took to be reaped are
speeds, which the bench reports and a test on a loaded CI machine must not depend on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_server import needs_redis

pytestmark = [
    pytest.mark.slow,
    needs_redis,
    pytest.mark.skipif(
        shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
        reason="needs nginx (apt-get install nginx-light; .ci/run installs it)",
    ),
]
BENCH = Path(__file__).resolve().parents[2] / "bench" / "replicas.py"
SPEEDS = ("jobs: three replicas faster than one", "jobs: ...within the lease bound")


def test_jobs_survive_a_sigkilled_replica(tmp_path: Path) -> None:
    out = tmp_path / "jobs.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--jobs", "45", "--job-s", "0.05", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    behaviour = {name: ok for name, ok in result["checks"].items() if not name.startswith(SPEEDS)}
    assert len(behaviour) == 7
    assert behaviour == dict.fromkeys(behaviour, True), result
    assert result["killed_replica_running"] >= 1
    assert result["finals"]["failed"] == len(result["replica_lost"])
    assert result["succeeded"] + len(result["replica_lost"]) == 45

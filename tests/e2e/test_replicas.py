"""bench/replicas.py, shortened: three service processes behind nginx as deploy/nginx documents."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
        reason="needs nginx (apt-get install nginx-light; .ci/run installs it)",
    ),
]
BENCH = Path(__file__).resolve().parents[2] / "bench" / "replicas.py"


def test_failover_drain_and_scale_out_behind_nginx(tmp_path: Path) -> None:
    out = tmp_path / "replicas.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["checks"] == dict.fromkeys(result["checks"], True), result
    assert done.returncode == 0
    assert result["scale_out_ratio"] >= 2.5
    assert result["burst"]["200"] > 0
    assert result["drained_counters"]["admitted"] > 0

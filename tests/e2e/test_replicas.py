"""bench/replicas.py, shortened: three service processes behind nginx as deploy/nginx documents.

The behaviour is asserted; the scale-out ratio is a speed and stays in the bench."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
        reason="needs nginx (apt-get install nginx-light; .ci/run installs it)",
    ),
]
BENCH = Path(__file__).resolve().parents[2] / "bench" / "replicas.py"


def run_bench(tmp_path: Path, *options: str) -> dict[str, Any]:
    """bench/replicas.py's result, as the JSON it writes (its output is shown if it wrote none)."""
    out = tmp_path / "replicas.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), *options, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def behaviour_checks(result: dict[str, Any], speeds: tuple[str, ...]) -> dict[str, bool]:
    """The bench's checks of outcomes, leaving out those of speed (named by their prefix)."""
    return {name: ok for name, ok in result["checks"].items() if not name.startswith(speeds)}


def test_failover_and_drain_behind_nginx(tmp_path: Path) -> None:
    """Outcomes only: the scale-out ratio is a speed, which bench/replicas.py reports and a
    test on a loaded CI machine must not depend on."""
    result = run_bench(tmp_path, "--quick")
    behaviour = behaviour_checks(result, ("three",))
    assert len(behaviour) == 4
    assert behaviour == dict.fromkeys(behaviour, True), result
    assert result["burst"]["200"] > 0
    assert result["drained_counters"]["admitted"] > 0
    assert result["three_replicas_via_nginx"]["200"] > 0

"""compose.yaml: two replicas on one Redis job store behind the shipped nginx rules.

No container registry is reachable here, so the file is checked offline: its wiring, and the
nginx configuration its start command makes from deploy/nginx/hunyuan.conf."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from hunyuan_service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_two_replicas_share_the_redis_store() -> None:
    services = COMPOSE["services"]
    assert {"replica-1", "replica-2", "redis", "nginx"} <= set(services)
    redis_args = services["redis"]["command"]
    password = redis_args[redis_args.index("--requirepass") + 1]
    for name in ("replica-1", "replica-2"):
        env = services[name]["environment"]
        assert env["JOB_STORE_URL"] == f"redis://:{password}@redis:6379/0"
        assert "redis" in services[name]["depends_on"]
        # Every variable is a real setting, and the defaults make valid settings.
        values: dict[str, Any] = {
            key.lower(): re.sub(r"\$\{[A-Z_]+:[-?]([^}]*)\}", r"\1", str(value))
            for key, value in env.items()
            if not key.startswith("HF_")
        }
        values["job_store_url"] = "redis://:pw@redis:6379/0"
        settings = Settings(_env_file=None, **values)
        assert settings.job_store_url is not None
        assert set(values) <= set(Settings.model_fields)
        grace = int(services[name]["stop_grace_period"].rstrip("s"))
        assert grace > float(env["SHUTDOWN_TIMEOUT_S"])
    gpus = {
        services[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0]
        for name in ("replica-1", "replica-2")
    }
    assert gpus == {"0", "1"}  # one GPU each


@pytest.mark.skipif(shutil.which("sed") is None, reason="needs sed")
def test_nginx_gets_the_shipped_rules_with_the_two_replicas(tmp_path: Path) -> None:
    nginx = COMPOSE["services"]["nginx"]
    assert "./deploy/nginx/hunyuan.conf:/etc/hunyuan/hunyuan.conf:ro" in nginx["volumes"]
    script = nginx["command"][-1].replace("$$", "$")
    script = script.replace("/etc/hunyuan/hunyuan.conf", str(ROOT / "deploy/nginx/hunyuan.conf"))
    script = script.replace("/etc/nginx/conf.d/default.conf", str(tmp_path / "out.conf"))
    script = script.split(" && exec ")[0]
    subprocess.run(["/bin/sh", "-c", script], check=True)
    made = (tmp_path / "out.conf").read_text()
    shipped = (ROOT / "deploy/nginx/hunyuan.conf").read_text()
    servers = re.findall(r"^ +server (\S+) max_fails=0;$", made, re.MULTILINE)
    assert servers == ["replica-1:8000", "replica-2:8000"]
    # Everything else, the retry rules included, is the shipped file's.
    rest = [line for line in made.splitlines() if "server replica-" not in line]
    assert rest == [line for line in shipped.splitlines() if "server 127.0.0.1:800" not in line]

"""The Kubernetes manifests: valid against the API schemas offline, and consistent with the
service (probe paths, a grace period above the drain, a GPU per pod)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hunyuan_service.settings import Settings

FOLDER = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
MANIFESTS = sorted(p for p in FOLDER.glob("*.yaml") if p.name != "kustomization.yaml")


def documents() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("version", ["1.30.0", "1.34.0"])
def test_every_manifest_is_valid_for_the_api(version: str) -> None:
    import kubernetes_validate

    for doc in documents():
        kubernetes_validate.validate(doc, version, strict=True)


def test_yamllint_passes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "yamllint", "-d", "{extends: default, rules: {document-start: "
         "disable, line-length: {max: 100}}}", str(FOLDER)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout


def test_the_deployment_matches_the_service() -> None:
    (deployment,) = [
        doc
        for doc in documents()
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "hunyuan-service"
    ]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"  # 200 while loading, by design
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(env["SHUTDOWN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= pause + drain + 10
    settings = Settings(_env_file=None, **{k.lower(): v for k, v in env.items() if v})
    assert settings.port == container["ports"][0]["containerPort"]
    assert settings.warmup_sizes == [(1024, 1024)]


def test_the_job_store_is_wired_through_the_secret_to_the_redis_service() -> None:
    (deployment,) = [
        doc
        for doc in documents()
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "hunyuan-service"
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (store,) = [item for item in container["env"] if item["name"] == "JOB_STORE_URL"]
    assert "value" not in store  # a URL with a password belongs in a secret
    assert store["valueFrom"]["secretKeyRef"]["key"] == "job-store-url"
    (service,) = [
        doc
        for doc in documents()
        if doc["kind"] == "Service" and doc["metadata"]["name"] == "hunyuan-redis"
    ]
    (redis,) = [
        doc
        for doc in documents()
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "hunyuan-redis"
    ]
    labels = redis["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert "hunyuan-redis:6379" in (FOLDER / "redis.yaml").read_text()
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    (kustomization,) = yaml.safe_load_all((FOLDER / "kustomization.yaml").read_text())
    assert "redis.yaml" in kustomization["resources"]

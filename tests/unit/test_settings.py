"""Settings: defaults, derived values and a clear refusal of each bad value."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from hunyuan_service.settings import Settings, describe_settings_error


def load(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


def refusal(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    with pytest.raises(ValidationError) as caught:
        load(monkeypatch, **env)
    return describe_settings_error(caught.value)


def test_defaults() -> None:
    settings = Settings(_env_file=None)
    assert settings.model_type == "text2image"
    assert settings.model_id == "black-forest-labs/FLUX.1-schnell"
    assert (settings.device, settings.dtype) == ("auto", "auto")
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    # One runs and eight wait: five concurrent reference clients all fit (README explains 8).
    assert settings.max_queue_size == 8
    assert settings.request_timeout_s == 300
    assert settings.shutdown_timeout_s == 30
    assert settings.api_key is None
    assert not settings.is_demo
    assert (settings.max_batch_size, settings.batch_wait_ms) == (1, 50)  # one job at a time
    assert (settings.job_result_ttl_s, settings.max_stored_jobs) == (3600, 256)
    assert settings.webhook_secret is None
    assert settings.allowed_webhook_domains == []


def test_webhook_secret_must_be_standard_webhooks_base64() -> None:
    with pytest.raises(ValueError, match="WEBHOOK_SECRET"):
        Settings(_env_file=None, webhook_secret="not base64!")
    with pytest.raises(ValueError, match="WEBHOOK_SECRET"):
        Settings(_env_file=None, webhook_secret="whsec_c2hvcnQ=")  # 5 bytes: too short
    good = Settings(_env_file=None, webhook_secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert good.webhook_secret is not None


def test_model_id_default_follows_the_model_type(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(monkeypatch, MODEL_TYPE="image2text").model_id == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_tiny_is_the_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(monkeypatch, MODEL_ID="tiny").is_demo


def test_media_domains_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch, ALLOWED_MEDIA_DOMAINS="Example.com, cdn.example.org.")
    assert settings.allowed_media_domains == ["example.com", "cdn.example.org"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MODEL_TYPE": "video"}, "MODEL_TYPE: Input should be 'text2image' or 'image2text'"),
        ({"DEVICE": "tpu"}, "DEVICE: Input should be 'auto', 'cuda', 'mps' or 'cpu'"),
        ({"DTYPE": "int4"}, "DTYPE: Input should be"),
        ({"PORT": "70000"}, "PORT: Input should be less than or equal to 65535"),
        ({"MAX_QUEUE_SIZE": "0"}, "MAX_QUEUE_SIZE: Input should be greater than or equal to 1"),
        ({"REQUEST_TIMEOUT_S": "-1"}, "REQUEST_TIMEOUT_S: Input should be greater than 0"),
        ({"MODEL_ID": "/no/such/folder"}, "MODEL_ID: folder '/no/such/folder' does not exist"),
        ({"MODEL_ID": "./missing"}, "does not exist"),
        ({"ALLOWED_LOCAL_MEDIA_DIR": "/no/such/dir"}, "ALLOWED_LOCAL_MEDIA_DIR: folder"),
    ],
)
def test_each_bad_value_is_named(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    message = refusal(monkeypatch, **env)
    assert expected in message
    assert "\n" not in message


def test_existing_model_folder_is_accepted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert load(monkeypatch, MODEL_ID=str(tmp_path)).model_id == str(tmp_path)


def test_bad_model_type_stops_the_command_fast_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hunyuan_service"],
        env={"MODEL_TYPE": "video", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "MODEL_TYPE" in lines[0]
    assert "text2image" in lines[0]
    assert "Traceback" not in result.stderr


def test_speed_options_default_to_the_lossless_eager_path() -> None:
    settings = Settings(_env_file=None)
    assert (settings.compile, settings.quantize, settings.offload) == ("off", "none", "none")
    assert settings.attention_backend == "native"
    assert (settings.fuse_qkv, settings.channels_last, settings.step_cache_threshold) == (
        False,
        False,
        0,
    )
    assert settings.decode_ahead is False
    assert (settings.compile_mode, settings.compile_vae) == ("default", False)
    assert settings.warmup_sizes == []


def test_warmup_sizes_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch, WARMUP="1024x1024, 768X1344")
    assert settings.warmup_sizes == [(1024, 1024), (768, 1344)]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"WARMUP": "1024"}, "WARMUP: '1024' is not WIDTHxHEIGHT"),
        ({"WARMUP": "1000x1000"}, "WARMUP: '1000x1000' is not WIDTHxHEIGHT"),
        ({"COMPILE": "max"}, "COMPILE: "),
        ({"QUANTIZE": "fp4"}, "QUANTIZE: "),
        ({"MODEL_TYPE": "image2text", "COMPILE": "regional"}, "COMPILE=regional: text2image only"),
        ({"MODEL_TYPE": "image2text", "OFFLOAD": "model"}, "OFFLOAD=model: text2image only"),
        ({"OFFLOAD": "group", "COMPILE": "full"}, "OFFLOAD with COMPILE=full"),
        ({"ATTENTION_BACKEND": "flash_hub"}, "ATTENTION_BACKEND=flash_hub: hub kernels"),
        ({"STEP_CACHE_THRESHOLD": "2"}, "STEP_CACHE_THRESHOLD: "),
        ({"DECODE_AHEAD": "true"}, "DECODE_AHEAD: image2text only"),
        ({"COMPILE_MODE": "fastest"}, "COMPILE_MODE: "),
        ({"COMPILE_MODE": "max-autotune"}, "COMPILE_MODE=max-autotune compiles nothing"),
        (
            {"MODEL_TYPE": "image2text", "COMPILE": "full", "COMPILE_MODE": "max-autotune"},
            "COMPILE_MODE=max-autotune: text2image only",
        ),
        ({"MODEL_TYPE": "image2text", "COMPILE_VAE": "true"}, "COMPILE_VAE: text2image only"),
        ({"OFFLOAD": "model", "COMPILE_VAE": "true"}, "OFFLOAD with COMPILE_VAE"),
    ],
)
def test_impossible_speed_options_are_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    assert named in refusal(monkeypatch, **env)


def test_lora_names_come_from_file_stems_then_loras(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for stem in ("watercolour", "ink-v2"):
        (tmp_path / f"{stem}.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an adapter")
    settings = load(
        monkeypatch,
        LORA_DIR=str(tmp_path),
        LORAS="pixel=org/pixel-lora:pixel_v1.safetensors, sketch=org/sketch",
    )
    assert settings.lora_names == ["ink-v2", "watercolour", "pixel", "sketch"]
    assert settings.max_loras_per_request == 3


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LORAS": "pixel"}, "LORAS: 'pixel' is not name=org/repo"),
        ({"LORAS": "a.b=org/repo"}, "LORAS: 'a.b=org/repo' is not name=org/repo"),
        ({"LORAS": "x=org/repo:weights.bin"}, "is not name=org/repo"),
        ({"LORA_DIR": "/no/such/folder"}, "LORA_DIR: folder '/no/such/folder' does not exist"),
        ({"LORAS": "x=o/r", "MODEL_TYPE": "image2text"}, "text2image only"),
        ({"LORAS": "x=o/r", "QUANTIZE": "int8"}, "LoRA adapters with QUANTIZE=int8"),
        ({"LORAS": "x=o/r", "FUSE_QKV": "true"}, "LoRA adapters with FUSE_QKV"),
        ({"MAX_LORAS_PER_REQUEST": "0"}, "MAX_LORAS_PER_REQUEST: "),
    ],
)
def test_bad_lora_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    assert named in refusal(monkeypatch, **env)


def test_a_lora_file_name_that_is_not_a_name_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "my style.safetensors").write_bytes(b"")
    message = refusal(monkeypatch, LORA_DIR=str(tmp_path))
    assert "LORA_DIR: file 'my style.safetensors': a LoRA's name is its file stem" in message


def test_the_readme_configuration_table_lists_exactly_the_settings() -> None:
    """`--help` is generated from the settings class; the README's table must name the same
    variables, so neither can drift from the other."""
    from hunyuan_service.settings import settings_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("| variable |"))
    rows = itertools.takewhile(lambda line: line.startswith("|"), section[start + 2 :])
    first_cells = [row.split("|")[1] for row in rows]
    documented = [name for cell in first_cells for name in re.findall(r"`([A-Z0-9_]+)`", cell)]
    assert len(documented) == len(set(documented)), "a variable is listed twice"
    assert set(documented) == {variable for variable, _default, _meaning in settings_table()}


def test_every_setting_has_a_meaning_for_the_help() -> None:
    from hunyuan_service.settings import settings_table

    missing = [variable for variable, _default, meaning in settings_table() if not meaning]
    assert missing == []


def test_the_job_store_url_is_redis_and_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    from hunyuan_service.engine.shared_jobs import redacted

    assert load(monkeypatch, JOB_STORE_URL="").job_store_url is None
    url = "redis://:hunter2pw@cache.internal:6380/3"
    settings = load(monkeypatch, JOB_STORE_URL=url)
    assert settings.job_store_url is not None
    assert settings.job_store_url.get_secret_value() == url
    assert "hunter2pw" not in repr(settings)
    assert redacted(url) == "redis://:***@cache.internal:6380/3"
    assert redacted("rediss://user:pw@host/0") == "rediss://user:***@host/0"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    message = refusal(monkeypatch, JOB_STORE_URL="http://:hunter2pw@cache.internal:6380")
    assert "JOB_STORE_URL: JOB_STORE_URL must start with redis:// or rediss://" in message
    assert "hunter2pw" not in message

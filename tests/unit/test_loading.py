"""Start-up reporting: download progress read from the Hugging Face cache, one-line causes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hunyuan_service.models.loading import describe_load_error, reporting_download
from hunyuan_service.settings import Settings


def test_download_progress_is_reported_while_the_cache_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    reports: list[str] = []
    downloading = threading.Event()

    def report(phase: str) -> None:
        reports.append(phase)
        if phase.startswith("downloading"):
            downloading.set()

    blobs = tmp_path / "models--someorg--model" / "blobs"
    staged = tmp_path / "staged"
    staged.write_bytes(b"x" * 3 * 2**20)
    with reporting_download("someorg/model", report, interval_s=0.01):
        blobs.mkdir(parents=True)
        # Appears whole (a rename), so the watcher never sees it half written.
        staged.rename(blobs / "0123abcd.incomplete")
        assert downloading.wait(30), "no progress was reported"
    assert reports[0] == "downloading someorg/model: 1 files, 3.0 MiB so far"
    assert reports[-1] == "loading model"


@pytest.mark.parametrize("model_id", ["tiny", "./a-local-folder", "/abs/path/to/model"])
def test_local_and_demo_models_are_not_watched(model_id: str) -> None:
    reports: list[str] = []
    with reporting_download(model_id, reports.append, interval_s=0.01):
        pass
    assert reports == []


def test_unknown_errors_are_left_to_the_traceback() -> None:
    settings = Settings(_env_file=None, model_id="someorg/model")
    assert describe_load_error(ValueError("a bug"), settings) is None

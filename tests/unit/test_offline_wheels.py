"""bench/offline_wheels.py: the wheels for an offline GPU host are pinned by the lock."""

from pathlib import Path

import pytest
from bench.offline_wheels import ROOT, WHEELS, pinned


def test_every_carried_wheel_is_pinned_at_the_locks_version() -> None:
    lock = (ROOT / "uv.lock").read_text()
    pins = pinned(WHEELS, ROOT / "uv.lock")
    assert len(pins) == len(WHEELS)
    for name, pin in zip(WHEELS, pins, strict=True):
        version = pin.removeprefix(f"{name}==")
        assert f'name = "{name}"\nversion = "{version}"\n' in lock
    assert "huggingface-hub" not in WHEELS  # the host's own 1.x; the lock's 2.x needs httpx2


def test_a_name_the_lock_lacks_is_refused_by_name(tmp_path: Path) -> None:
    lock = tmp_path / "uv.lock"
    lock.write_text('[[package]]\nname = "fastapi"\nversion = "1.0"\n')
    assert pinned(("fastapi",), lock) == ["fastapi==1.0"]
    with pytest.raises(SystemExit, match=r"not in uv\.lock: uvicorn"):
        pinned(("fastapi", "uvicorn"), lock)

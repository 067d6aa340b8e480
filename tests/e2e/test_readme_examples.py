"""Every README example that talks to the service runs, as written, against the tiny models.

Each such block starts with a label line, `# MODEL_TYPE=<type> [VAR=value ...]`, naming the
service it needs; a block that calls the service without one fails this test. curl is made to
fail on any HTTP error (a `.curlrc` with `fail-with-body`), so an example that answers 4xx fails.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.images import encoded, png_bytes
from tests.service_process import ServiceProcess, tiny_env
from tests.videos import video_bytes

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.S)
pytestmark = pytest.mark.slow


def examples() -> dict[tuple[tuple[str, str], ...], list[tuple[str, str]]]:
    """README blocks that call the service, grouped by the service settings they need."""
    groups: dict[tuple[tuple[str, str], ...], list[tuple[str, str]]] = {}
    for language, code in BLOCK.findall(README.read_text()):
        if "localhost:8000" not in code or "uv run hunyuan-service" in code:
            continue
        label = code.splitlines()[0]
        assert label.startswith("# MODEL_TYPE="), f"unlabelled README example:\n{code}"
        pairs = label[2:].split(":", 1)[0].split()
        env = tuple(sorted(tuple(pair.split("=", 1)) for pair in pairs))
        groups.setdefault(env, []).append((language, code))
    return groups


def make_lora(tiny_cache: Path, folder: Path) -> Path:
    from diffusers import FluxTransformer2DModel

    from hunyuan_service.models.tiny import build_flux_lora, ensure_tiny_checkpoint

    checkpoint = ensure_tiny_checkpoint("text2image", tiny_cache)
    transformer = FluxTransformer2DModel.from_pretrained(checkpoint / "transformer")
    folder.mkdir()
    build_flux_lora(transformer, folder / "watercolour.safetensors", seed=1)
    return folder


def test_the_readme_labels_its_examples() -> None:
    found = examples()
    types = {dict(env)["MODEL_TYPE"] for env in found}
    assert types == {"text2image", "image2text"}
    assert sum(len(blocks) for blocks in found.values()) >= 8


@pytest.mark.skipif(shutil.which("curl") is None, reason="the examples use curl")
@pytest.mark.parametrize("env", list(examples()), ids=lambda env: "+".join(v for _, v in env))
def test_readme_examples_run_as_written(
    env: tuple[tuple[str, str], ...], tiny_cache: Path, tmp_path: Path
) -> None:
    (tmp_path / ".curlrc").write_text("fail-with-body\nshow-error\n")
    (tmp_path / "cat.png").write_bytes(png_bytes((96, 64)))
    (tmp_path / "cat.jpg").write_bytes(encoded(Image.new("RGB", (64, 64), (90, 60, 30)), "JPEG"))
    (tmp_path / "dog.png").write_bytes(png_bytes((48, 80)))
    mask = Image.new("L", (96, 64), 0)  # cat.png's size, white where to repaint
    mask.paste(255, (0, 0, 48, 64))
    (tmp_path / "mask.png").write_bytes(encoded(mask, "PNG"))
    (tmp_path / "clip.mp4").write_bytes(video_bytes("mp4", frames=8, size=(64, 48)))
    settings = tiny_env(tiny_cache, **dict(env))
    if "LORA_DIR" in settings:  # the adapter the example names, made for the tiny FLUX
        settings["LORA_DIR"] = str(make_lora(tiny_cache, tmp_path / settings["LORA_DIR"]))
    with ServiceProcess(settings) as service:
        for language, code in examples()[env]:
            code = code.replace("http://localhost:8000", service.url)
            code = code.replace("localhost:8000", service.url.removeprefix("http://"))
            if language == "bash":
                command = ["bash", "-e", "-c", code]
            else:
                command = [sys.executable, "-c", code]
            done = subprocess.run(
                command,
                cwd=tmp_path,
                env={**service.env, "CURL_HOME": str(tmp_path), "HOME": str(tmp_path)},
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            # curl error 23 is `| head` closing the pipe early, as the example means it to.
            failed = done.returncode != 0 or re.search(r"curl: \((?!23\))", done.stderr)
            assert not failed, (
                f"{code}\n--- stdout\n{done.stdout[-2000:]}\n--- stderr\n{done.stderr}"
            )

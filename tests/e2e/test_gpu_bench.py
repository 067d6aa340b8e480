"""`bench/gpu.py --device cpu --tiny` runs every quick-mode measurement on the tiny models, so the
real-size benchmark cannot rot between the rare sessions that have a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_with_the_tiny_models(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--tiny",
               "--quick", "--profile", "--budget-s", "100000", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    rows = {(row["section"], row.get("variant")): row for row in result["rows"]}
    assert not [row for row in result["rows"] if "failed" in str(row.get("note"))]
    assert result["meta"]["tiny"] is True
    assert "torch" in result["meta"]
    # baseline, 3 service variants and their profiles, 2 HTTP rows
    assert (tmp_path / "gpu.md").read_text().count("| FLUX.1-dev |") == 9

    flux = {variant: row for (section, variant), row in rows.items() if section == "FLUX.1-dev"}
    assert flux["diffusers FluxPipeline, eager (baseline)"]["s_per_image"] > 0
    assert flux["service, eager"]["quality"] == "identical"  # same seed, same weights
    cached = flux["service, eager, the prompt repeated (prompt-embedding cache hits)"]
    assert cached["quality"] == "identical"
    lossless = flux["service, lossless: fused QKV + channels-last + regional compile"]
    assert lossless["quality"] == "identical" or float(lossless["quality"].split()[1]) > 40
    http = [row for variant, row in flux.items() if variant.startswith("whole service")]
    assert [row["variant"].rsplit(", ", 1)[1] for row in http] == ["png response", "jpeg response"]
    assert all(row["s_per_image"] > 0 and "service adds" in row["note"] for row in http)

    qwen = {variant: row for (section, variant), row in rows.items() if section == "Qwen2.5-VL-7B"}
    assert qwen["transformers generate, eager (baseline)"]["tok_per_s"] > 0
    # The text each service variant answered in its timed calls, against the baseline's: the
    # eager one and decoding ahead must keep the tokens exactly (fp32 on the CPU).
    assert qwen["service, eager"]["quality"] == "same text as the baseline (8 tokens)"
    ahead = qwen["service, compiled decode + decode ahead"]
    assert ahead["quality"] == "same text as the baseline (8 tokens)"
    # Every rate is a decode rate, or labelled as the whole call's and then compared with none.
    for row in qwen.values():
        if "whole call" in str(row.get("note")):
            assert row["vs_baseline"] is None or row["variant"].startswith("transformers")
    assert qwen["service, eager + JSON-schema constraint"]["tok_per_s"] > 0
    compiled = qwen["service, static cache + compiled decode (CUDA graph)"]
    assert compiled["tok_per_s"] > 0
    assert compiled["ttft_s"] > 0
    assert ahead["tok_per_s"] > 0

    # The concurrency section: the continuous decoder through the engine, and over HTTP.
    waves = {v: r for (s, v), r in rows.items() if s == "Qwen2.5-VL-7B, continuous batching"}
    for clients in (1, 8, 32, 64):
        row = waves[f"engine, continuous batching, {clients} clients"]
        assert row["tok_per_s"] > 0
        assert "time per output token" in row["note"]
        assert "the first wave of this size took" in row["note"]
    assert "of a measured cpu copy" in waves["batch 1 as a share of memory bandwidth"]["note"]
    assert waves["whole service over HTTP, 8 clients"]["tok_per_s"] > 0
    join = waves["4 running rows while a request with 4 one-megapixel images joins"]
    assert "ms with the encoder a block at a time" in join["note"]
    # DECODE_AHEAD's waves keep every answer (fp32 on the CPU) and report their ratio.
    for clients in (1, 8, 32):
        row = waves[f"DECODE_AHEAD vs CUDA graphs, {clients} clients"]
        assert f"{clients} of {clients} answers identical" in row["note"]
        assert row["vs_baseline"] > 0
    # The waves held to a JSON schema, against the same waves without it, both ways.
    for label in ("", "DECODE_AHEAD, "):
        for clients in (1, 8):
            row = waves[f"{label}JSON-schema constraint vs without, {clients} clients"]
            assert row["vs_baseline"] > 0

    # --profile: one profiled call per service variant, summarised in a row and a file
    services = [(s, v) for (s, v) in rows if v.startswith("service, ") and "[" not in v]
    services = [(s, v) for (s, v) in services if "constraint" not in v]
    assert len(services) == 6
    for section, variant in services:
        note = rows[(section, f"{variant} [profiled once]")]["note"]
        unit = "step" if section.startswith("FLUX") else "token"
        assert note.startswith(f"per {unit}: wall "), note
        table = (tmp_path / note.rsplit("; ", 1)[1]).read_text()
        assert table.count("\n| ") >= 5  # the header and the heaviest operators
    # ... and the continuous decoder's steps at 1 and 32 rows, every row answered.
    for count in (1, 32):
        note = waves[f"continuous decoder, {count} rows, 8 steps [profiled once]"]["note"]
        assert note.startswith("per step: wall "), note
        assert f"; {count} of {count} rows answered; profile-" in note
        assert (tmp_path / note.rsplit("; ", 1)[1]).read_text().count("\n| ") >= 5

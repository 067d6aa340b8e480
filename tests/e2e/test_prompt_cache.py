"""The prompt-embedding cache of text2image (PROMPT_CACHE_BYTES), on the tiny FLUX model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from hunyuan_service.models.base import JobContext
from tests.e2e.conftest import tiny_settings
from tests.metrics import value


def load(cache: Path, **options: Any) -> Any:
    from hunyuan_service.models.flux import FluxModel

    model = FluxModel(tiny_settings("text2image", cache, **options))
    model.load()
    return model


def draw(model: Any, prompt: str = "a lighthouse", seed: int = 11) -> Any:
    from hunyuan_service.models.types import Text2ImageInput

    request = Text2ImageInput(prompt, 64, 64, num_inference_steps=2, seed=seed)
    return np.asarray(model.infer(request, JobContext()).image)


@pytest.fixture
def encodings(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Counts the pipeline's prompt encodings, model by model (its call passes embeddings
    through `encode_prompt` again, with no prompt: not an encoding)."""

    def spy(model: Any) -> list[Any]:
        calls: list[Any] = []
        original = model.pipe.encode_prompt

        def counted(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("prompt") is not None:
                calls.append(kwargs["prompt"])
            return original(*args, **kwargs)

        monkeypatch.setattr(model.pipe, "encode_prompt", counted)
        return calls

    return spy


def test_a_repeated_prompt_skips_the_text_encoders_and_gives_the_same_image(
    tiny_cache: Path, encodings: Any
) -> None:
    model = load(tiny_cache)
    calls = encodings(model)
    first = draw(model)
    again = draw(model)
    assert np.array_equal(first, again)  # bit-identical on a hit
    assert calls == [["a lighthouse"]]
    other_seed = draw(model, seed=12)
    assert not np.array_equal(first, other_seed)
    assert len(calls) == 1  # a new seed reuses the prompt's embeddings
    draw(model, prompt="a harbour")
    assert calls == [["a lighthouse"], ["a harbour"]]
    stats = model.prompt_cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (2, 2, 2)
    assert stats["bytes"] > 0


def test_without_the_cache_the_image_is_the_same_and_the_pipelines_own(
    tiny_cache: Path, flux: Any, encodings: Any
) -> None:
    import torch

    off = load(tiny_cache, prompt_cache_bytes=0)
    calls = encodings(off)
    image = draw(off)
    draw(off)
    assert len(calls) == 2  # off: every request encodes
    assert off.prompt_cache.stats()["entries"] == 0
    assert np.array_equal(image, draw(flux))
    # diffusers encoding the prompt itself, inside its own call, gives the same image.
    own = flux.pipe(
        prompt="a lighthouse",
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=flux.defaults.guidance_scale,
        max_sequence_length=flux.defaults.max_sequence_length,
        generator=torch.Generator("cpu").manual_seed(11),
        output_type="pil",
    ).images[0]
    assert np.abs(np.asarray(own, dtype=np.int16) - image.astype(np.int16)).max() <= 1


def test_a_batch_reads_and_fills_the_cache_row_by_row(tiny_cache: Path, encodings: Any) -> None:
    from hunyuan_service.models.types import Text2ImageInput

    model = load(tiny_cache)
    calls = encodings(model)
    alone = draw(model, prompt="a lighthouse", seed=5)
    requests = [
        Text2ImageInput(prompt, 64, 64, num_inference_steps=2, seed=5)
        for prompt in ("a lighthouse", "a harbour")
    ]
    outputs = model.infer_batch(requests, [JobContext(), JobContext()])
    assert calls == [["a lighthouse"], ["a harbour"]]  # the first row was a hit
    batched = np.asarray(outputs[0].image, dtype=np.int16)
    assert np.abs(batched - alone.astype(np.int16)).max() <= 1


def test_metrics_report_the_hit_ratio(flux_client: TestClient) -> None:
    body = {"prompt": "metrics prompt cache", "width": 64, "height": 64, "seed": 3}
    for _ in range(2):
        assert flux_client.post("/infer", json=body).status_code == 200
    text = flux_client.get("/metrics").text
    labels = {"cache": "prompt_embeddings"}
    assert value(text, "hunyuan_cache_lookups_total", outcome="hit", **labels) >= 1
    assert value(text, "hunyuan_cache_lookups_total", outcome="miss", **labels) >= 1
    assert 0 < value(text, "hunyuan_cache_hit_ratio", **labels) < 1
    assert value(text, "hunyuan_cache_bytes", **labels) > 0

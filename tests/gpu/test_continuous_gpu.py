"""The continuous decoder's CUDA graphs on the tiny Qwen2.5-VL: captured at load, replayed for
every step, and giving exactly the tokens of the same step run eagerly at the same shapes.

Skipped where CUDA is absent. Run on a GPU host with `uv run pytest -m gpu`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

pytestmark = pytest.mark.gpu


def cuda_qwen(tiny_cache: Path, ahead: bool) -> Any:
    """The tiny Qwen in float32 on CUDA with the continuous decoder (MAX_BATCH_SIZE 4)."""
    from hunyuan_service.models.qwen_vl import QwenVLModel
    from hunyuan_service.settings import Settings

    settings = Settings(
        _env_file=None,
        model_type="image2text",
        model_id="tiny",
        cache_dir=tiny_cache,
        device="cuda",
        dtype="float32",
        max_batch_size=4,
        decode_ahead=ahead,  # tokens fed to the next step unread, read a step later
    )
    model = QwenVLModel(settings)
    model.load()
    return model


def ask(text: str, tokens: int, **options: Any) -> Any:
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    return Image2TextInput((ChatMessage("user", text),), max_new_tokens=tokens, **options)


@pytest.mark.parametrize("ahead", [False, True])
def test_graphs_replay_every_step_with_the_eager_steps_tokens(
    tiny_cache: Path, ahead: bool
) -> None:
    from tests.continuous_feed import run_together

    model = cuda_qwen(tiny_cache, ahead)
    graphs = model.decoder.padded
    assert graphs is not None
    assert len(graphs.graphs) == len(graphs.buckets()) > 0

    requests = {
        "a": ask("Hi", 12),
        "b": ask("Tell me a long story", 30),
        "c": ask("Surprise me", 10, temperature=0.9, seed=5),
        "d": ask("Go", 3),
    }
    captured = run_together(model, requests).outcomes
    assert graphs.replays > 0
    assert graphs.padded_steps == 0
    assert graphs.eager_steps == 0
    model.decoder.pad_steps(4, capture=False)  # the same shapes, eagerly
    model.decoder.ahead = False
    eager = run_together(model, requests).outcomes
    assert model.decoder.padded.padded_steps > 0
    for key in requests:
        assert captured[key] == eager[key], key  # text, token counts and finish reason


@pytest.mark.parametrize("ahead", [False, True])
def test_a_step_never_waits_for_the_device_but_on_its_tokens_copy(
    tiny_cache: Path, ahead: bool
) -> None:
    """Every row kind, its step run with CUDA's sync debugging set to raise: an implicit wait (a
    `.item()`, a blocking copy, a data-dependent shape) inside a step would fail its rows. The
    one wait a step has is its tokens' copy event (the step before's, with DECODE_AHEAD)."""
    from hunyuan_service.models.grammar import compile_response_format
    from hunyuan_service.models.types import Image2TextOutput
    from tests.continuous_feed import run_together

    model = cuda_qwen(tiny_cache, ahead)
    step = model.decoder.step
    steps = []

    def strict() -> Any:
        steps.append(len(model.decoder.rows))
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    model.decoder.step = strict
    schema = {"type": "array", "items": {"enum": ["cat", "dog"]}, "minItems": 1, "maxItems": 3}
    requests = {
        "greedy": ask("Hi", 12),
        "penalty": ask("Say it again", 9, repetition_penalty=1.3),
        "seeded": ask("Surprise me", 10, temperature=0.9, top_p=0.95, top_k=20, seed=5),
        "grammar": ask("Pets?", 20, grammar=compile_response_format("json_schema", schema, "p")),
    }
    outcomes = run_together(model, requests).outcomes
    assert max(steps) == 4
    for key, outcome in outcomes.items():
        assert isinstance(outcome, Image2TextOutput), (key, outcome)

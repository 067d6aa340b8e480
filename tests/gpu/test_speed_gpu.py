"""GPU-only speed options on the tiny models: fp8, offload, attention backends, CUDA graphs.

Skipped where CUDA is absent. Run on a GPU host with `uv run pytest -m gpu`. Tolerances are in
PSNR against the eager bf16 image: bf16 kernels differ in rounding, so exact equality is not
expected of lossless options here as it is in float32 on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

pytestmark = pytest.mark.gpu


def load_flux(cache: Path, **options: Any) -> Any:
    from hunyuan_service.models.flux import FluxModel
    from hunyuan_service.settings import Settings

    settings = Settings(
        _env_file=None, model_type="text2image", model_id="tiny", cache_dir=cache, **options
    )
    model = FluxModel(settings)
    model.load()
    model.warm_up()
    return model


def draw(model: Any) -> Any:
    from hunyuan_service.models.base import JobContext
    from hunyuan_service.models.types import Text2ImageInput

    request = Text2ImageInput("a lighthouse", 128, 128, num_inference_steps=3, seed=11)
    return np.asarray(model.infer(request, JobContext()).image, dtype=np.float64)


def psnr(a: Any, b: Any) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def eager_image(tiny_cache: Path) -> Any:
    return draw(load_flux(tiny_cache))


@pytest.mark.parametrize(
    "options",
    [
        {"offload": "model"},
        {"offload": "sequential"},
        {"offload": "group"},
        {"attention_backend": "_native_cudnn"},
        {"compile": "regional", "fuse_qkv": True, "channels_last": True, "warmup": ["128x128"]},
    ],
)
def test_lossless_gpu_options_keep_the_eager_image(
    tiny_cache: Path, eager_image: Any, options: dict[str, Any]
) -> None:
    assert psnr(draw(load_flux(tiny_cache, **options)), eager_image) > 35


def test_fp8_stays_near_eager_where_the_gpu_has_fp8(tiny_cache: Path, eager_image: Any) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    model = load_flux(tiny_cache, quantize="fp8")
    assert model.info.extra["quantize"] == "fp8"
    assert psnr(draw(model), eager_image) > 20


def test_compiled_qwen_decode_runs_as_a_cuda_graph_and_stops_within_a_token(
    tiny_cache: Path,
) -> None:
    from hunyuan_service.errors import JobCancelled
    from hunyuan_service.models.base import JobContext
    from hunyuan_service.models.qwen_vl import QwenVLModel
    from hunyuan_service.models.types import ChatMessage, Image2TextInput
    from hunyuan_service.settings import Settings

    settings = Settings(
        _env_file=None, model_type="image2text", model_id="tiny", cache_dir=tiny_cache,
        compile="full", warmup=["64x64"],
    )  # fmt: skip
    model = QwenVLModel(settings)
    model.load()
    model.warm_up()
    request = Image2TextInput((ChatMessage("user", "Describe"),), max_new_tokens=30)
    pieces: list[str] = []
    output = model.infer(request, JobContext(on_token=pieces.append))
    assert "".join(pieces) == output.text
    seen: list[str] = []
    with pytest.raises(JobCancelled):
        model.infer(request, JobContext(on_token=seen.append, should_stop=lambda: len(seen) >= 2))
    assert len(seen) <= 3


def synchronisations_per_token(model: Any, rows: int = 1) -> float:
    """Host waits on the device per generated token, as CUDA's sync debug mode reports them;
    with `rows` > 1, for a batch of that many requests.

    Each length is run once before it is counted, so that one-time waits (a cache or an
    allocator growing, a lazy initialisation, whatever ran before in the same process) fall into
    the uncounted run: the difference between the two lengths is then per-token waits only.
    """
    import warnings

    from hunyuan_service.models.base import JobContext
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    def count(tokens: int) -> int:
        requests = [
            Image2TextInput((ChatMessage("user", f"Describe {i}"),), max_new_tokens=tokens)
            for i in range(rows)
        ]
        contexts = [JobContext(on_token=lambda text: None) for _ in requests]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                if rows == 1:
                    outputs = [model.infer(requests[0], contexts[0])]
                else:
                    outputs = model.infer_batch(requests, contexts)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert [output.completion_tokens for output in outputs] == [tokens] * rows
        return sum("synchroniz" in str(w.message) for w in caught)

    counts = {}
    for tokens in (8, 40):
        count(tokens)  # warm: one-time waits happen here, uncounted
        counts[tokens] = count(tokens)
    per_token = (counts[40] - counts[8]) / 32
    assert per_token >= 0, f"fewer waits for more tokens: {counts}"
    return per_token


def test_decoding_ahead_keeps_the_tokens_and_never_waits_on_the_device_per_token(
    tiny_cache: Path,
) -> None:
    from hunyuan_service.models.base import JobContext
    from hunyuan_service.models.qwen_vl import QwenVLModel
    from hunyuan_service.models.types import ChatMessage, Image2TextInput
    from hunyuan_service.settings import Settings

    models = {}
    for ahead in (False, True):
        settings = Settings(
            _env_file=None, model_type="image2text", model_id="tiny", cache_dir=tiny_cache,
            compile="full", warmup=["64x64"], decode_ahead=ahead,
        )  # fmt: skip
        models[ahead] = QwenVLModel(settings)
        models[ahead].load()
        models[ahead].model.generation_config.eos_token_id = []  # exactly max_new_tokens
        models[ahead].warm_up()
    request = Image2TextInput((ChatMessage("user", "Describe"),), max_new_tokens=30)
    texts = [models[ahead].infer(request, JobContext()).text for ahead in (False, True)]
    assert texts[0] == texts[1]
    assert synchronisations_per_token(models[False]) >= 1  # the probe sees the stop check's
    assert synchronisations_per_token(models[True]) == 0
    assert synchronisations_per_token(models[True], rows=2) == 0  # a batch's row stops too

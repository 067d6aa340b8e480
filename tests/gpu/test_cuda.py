"""On a CUDA host: device and dtype selection, the tiny models on the GPU, and real OOM recovery.

Skipped where CUDA is absent (CI and the development machines). Run on a GPU host with
`uv run pytest -m gpu`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.images import png_bytes

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

pytestmark = pytest.mark.gpu


def gpu_settings(model_type: str, cache: Path) -> Any:
    from hunyuan_service.settings import Settings

    return Settings(_env_file=None, model_type=model_type, model_id="tiny", cache_dir=cache)


@pytest.fixture(scope="module")
def flux(tiny_cache: Path) -> Any:
    from hunyuan_service.models.flux import FluxModel

    model = FluxModel(gpu_settings("text2image", tiny_cache))
    model.load()
    return model


def test_auto_picks_cuda_and_bfloat16_for_flux(flux: Any) -> None:
    from hunyuan_service.models.base import JobContext
    from hunyuan_service.models.types import Text2ImageInput

    assert (flux.info.device, flux.info.dtype) == ("cuda", "bfloat16")
    assert next(flux.pipe.transformer.parameters()).device.type == "cuda"
    output = flux.infer(Text2ImageInput("a fox", 256, 128, seed=3), JobContext())
    again = flux.infer(Text2ImageInput("a fox", 256, 128, seed=3), JobContext())
    assert output.image.size == (256, 128)
    assert output.image.tobytes() == again.image.tobytes()


def test_qwen_runs_on_cuda(tiny_cache: Path) -> None:
    from hunyuan_service.media import decode_image
    from hunyuan_service.models.base import JobContext
    from hunyuan_service.models.qwen_vl import QwenVLModel
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    model = QwenVLModel(gpu_settings("image2text", tiny_cache))
    model.load()
    assert (model.info.device, model.info.dtype) == ("cuda", "bfloat16")
    image = decode_image(png_bytes(), "images[0]", model.settings)
    request = Image2TextInput(
        messages=(ChatMessage("user", "Describe", (image,)),), max_new_tokens=8
    )
    output = model.infer(request, JobContext())
    assert output.prompt_tokens > 0
    assert 1 <= output.completion_tokens <= 8


def test_qwen_normalises_images_on_the_gpu_as_the_cpu_would(tiny_cache: Path) -> None:
    """The image processor runs on the model's device (a uint8 image crosses, not its float32
    patches) and gives the CPU's pixel values: the image is already sized, so the processor
    only rescales, normalises and cuts patches. Then the encoder, a block at a time, gives
    what the model's own `get_image_features` gives."""
    import numpy as np
    from PIL import Image

    from hunyuan_service.models.qwen_vl import QwenVLModel

    model = QwenVLModel(gpu_settings("image2text", tiny_cache))
    model.load()
    pixels = np.random.default_rng(0).integers(0, 256, (112, 168, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    processor = model.processor.image_processor
    on_cpu = processor(images=[image], return_tensors="pt")
    on_gpu = processor(images=[image], return_tensors="pt", device=model.model.device)
    assert on_gpu["pixel_values"].device.type == "cuda"
    assert torch.equal(on_gpu["image_grid_thw"], on_cpu["image_grid_thw"])
    assert torch.allclose(on_gpu["pixel_values"].cpu(), on_cpu["pixel_values"], rtol=0, atol=1e-6)
    # The encoder a block at a time (models/vision.py) gives the model's own features.
    before = model.images.encoded
    item = model.images._image(image, tuple(sorted(model._pixel_bounds(None).items())), {})
    assert item.pixels.device.type == "cuda"
    assert torch.equal(item.grid, on_cpu["image_grid_thw"])
    vision = model.model.model
    with torch.inference_mode():
        expected = vision.get_image_features(item.pixels, item.grid.cuda()).pooler_output[0]
        while item.features is None:
            item.run_block()
    assert model.images.encoded == before + 1
    assert torch.equal(item.features, expected)


def test_real_cuda_oom_fails_one_job_and_the_next_one_runs(flux: Any) -> None:
    from hunyuan_service.engine.scheduler import Scheduler
    from hunyuan_service.errors import OutOfMemory
    from hunyuan_service.models.flux import FluxModel
    from hunyuan_service.models.types import Text2ImageInput

    class Greedy(FluxModel):
        """Asks for a terabyte when the prompt says so: a real torch.cuda.OutOfMemoryError."""

        def infer(self, request: Text2ImageInput, ctx: Any) -> Any:
            if request.prompt == "oom":
                torch.empty(1 << 40, dtype=torch.uint8, device="cuda")
            return super().infer(request, ctx)

    greedy = Greedy(flux.settings)
    greedy.pipe, greedy.device, greedy.defaults = flux.pipe, flux.device, flux.defaults

    async def scenario() -> Any:
        scheduler = Scheduler(greedy, max_queue_size=4, request_timeout_s=60)
        scheduler.start()
        with pytest.raises(OutOfMemory, match="smaller size"):
            await scheduler.wait(scheduler.submit(Text2ImageInput("oom", 64, 64), "r0"))
        output = await scheduler.wait(scheduler.submit(Text2ImageInput("ok", 64, 64), "r1"))
        await scheduler.stop()
        return output, scheduler.counters

    output, counters = asyncio.run(scenario())
    assert output.image.size == (64, 64)
    assert counters["out_of_memory"] == 1
    assert counters["completed"] == 1

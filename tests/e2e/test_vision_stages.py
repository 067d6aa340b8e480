"""The vision encoder a block at a time (models/vision.py): the model's own features, and rows
that go on decoding while a joining request's image is encoded between their steps."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from hunyuan_service.models.base import JobContext
from hunyuan_service.models.types import ChatMessage, Image2TextInput
from hunyuan_service.models.vision import Budget, Encoding, VisionPlan
from tests.continuous_feed import run_together
from tests.e2e.conftest import tiny_settings

DEPTH = 4


@pytest.fixture(scope="module")
def deep(tiny_cache: Path) -> Any:
    """The tiny Qwen2.5-VL with a vision encoder of 4 blocks (windowed, full, windowed, full),
    served by the continuous decoder, the vision cache off so that every image is encoded."""
    from hunyuan_service.models.qwen_vl import QwenVLModel
    from hunyuan_service.models.tiny import QwenVLShape, build_qwen_vl

    torch.manual_seed(0)
    vision = {
        "depth": DEPTH,
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_heads": 2,
        "fullatt_block_indexes": [1, 3],
    }
    model, processor = build_qwen_vl(QwenVLShape(vision=vision))
    settings = tiny_settings(
        "image2text", tiny_cache, max_batch_size=4, vision_cache_bytes=0, prefill_chunk_tokens=16
    )
    served = QwenVLModel(settings)
    served.adopt(model, processor)
    # Random weights may end a text early; these tests need rows of the length they ask for.
    served.model.generation_config.eos_token_id = None
    served.decoder.eos = frozenset()
    return served


def picture(seed: int, width: int = 224, height: int = 168) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def image_encoding(deep: Any, image: Image.Image) -> Encoding:
    pixels = deep.processor.image_processor(images=[image], return_tensors="pt")
    return Encoding(deep.images, "test", pixels["pixel_values"], pixels["image_grid_thw"])


def test_block_by_block_gives_the_models_own_image_and_video_features(deep: Any) -> None:
    image = image_encoding(deep, picture(1))  # 16 x 12 patches: several attention windows
    frames = torch.from_numpy(np.stack([np.asarray(picture(n)) for n in range(4)]))
    clip = deep.processor.video_processor(
        videos=[frames.permute(0, 3, 1, 2)], do_sample_frames=False, return_tensors="pt"
    )
    video = Encoding(deep.images, "clip", clip["pixel_values_videos"], clip["video_grid_thw"])
    assert int(video.grid[0, 0]) == 2  # two temporal patches: the full blocks attend per frame
    vision = deep.model.model
    with torch.inference_mode():
        expected = {
            "image": vision.get_image_features(image.pixels, image.grid).pooler_output[0],
            "video": vision.get_video_features(video.pixels, video.grid).pooler_output[0],
        }
        for name, item in (("image", image), ("video", video)):
            blocks = 0
            while item.features is None:
                item.run_block()
                blocks += 1
            assert blocks == DEPTH, name
            assert torch.equal(item.features, expected[name]), name
    # The full-attention blocks (each frame whole) cost more than the windowed ones.
    assert image.costs[1] > image.costs[2]
    assert image.costs[3] > image.costs[2]


def test_a_budget_runs_the_blocks_it_covers_and_always_one(deep: Any) -> None:
    image = image_encoding(deep, picture(2))
    plan = VisionPlan({"input_ids": torch.ones(1, 9)}, {"image": [image], "video": []})
    assert not plan.encode(Budget(0))  # a turn always runs its first block
    assert image.done == 1
    # One short of two blocks: the next one runs, the one after it waits for the next turn.
    assert not plan.encode(Budget(image.costs[1] + image.costs[2] - 1))
    assert image.done == 2
    assert plan.encode(Budget(image.costs[2] + image.costs[3]))
    assert image.done == DEPTH
    assert image.features is not None


def test_running_rows_decode_between_the_blocks_of_a_joining_image(
    deep: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = deep.decoder
    # One chunk of 16 prompt tokens costs the tiny text model far less than one vision block.
    image = picture(3)
    first = image_encoding(deep, image)
    assert decoder.turn_budget().left < min(first.costs)
    events: list[str] = []
    run_block, step = Encoding.run_block, decoder.step

    def block(self: Encoding) -> None:
        events.append("block")
        run_block(self)

    def stepped() -> Any:
        events.append("step")
        return step()

    monkeypatch.setattr(Encoding, "run_block", block)
    monkeypatch.setattr(decoder, "step", stepped)
    requests = {
        "running": Image2TextInput((ChatMessage("user", "Tell a long story"),), 40),
        "joining": Image2TextInput((ChatMessage("user", "Describe", (image,)),), 6),
    }
    together = run_together(deep, requests).outcomes
    blocks = [index for index, event in enumerate(events) if event == "block"]
    assert len(blocks) == DEPTH
    # A decode step of the running row between every two blocks of the joining image.
    assert all("step" in events[a:b] for a, b in itertools.pairwise(blocks))
    monkeypatch.setattr(decoder, "step", step)
    for key, request in requests.items():
        assert together[key] == deep.infer(request, JobContext()), key


def test_a_job_stopped_while_its_image_is_encoded_runs_no_more_blocks(
    deep: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hunyuan_service.errors import JobCancelled

    blocks: list[int] = []
    run_block = Encoding.run_block
    stopped = False

    def block(self: Encoding) -> None:
        nonlocal stopped
        blocks.append(self.done)
        run_block(self)
        stopped = self.done == 2  # cancelled halfway through its encoding

    monkeypatch.setattr(Encoding, "run_block", block)
    cancelled = JobContext(should_stop=lambda: stopped)
    requests = {
        "running": Image2TextInput((ChatMessage("user", "Tell a long story"),), 30),
        "joining": Image2TextInput((ChatMessage("user", "Describe", (picture(4),)),), 6),
    }
    together = run_together(deep, requests, {"joining": cancelled}).outcomes
    assert isinstance(together["joining"], JobCancelled)
    assert blocks == [0, 1]
    assert together["running"].completion_tokens == 30


@pytest.mark.parametrize("path", ["alone", "static batch"])
def test_a_job_stopped_while_encoded_alone_runs_no_more_blocks(
    deep: Any, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """MAX_BATCH_SIZE=1's path and static batches encode a request's images whole, and still
    stop between two blocks once the job (every job of the batch) stops."""
    from hunyuan_service.errors import JobCancelled

    blocks: list[int] = []
    run_block = Encoding.run_block

    def block(self: Encoding) -> None:
        blocks.append(self.done)
        run_block(self)

    monkeypatch.setattr(Encoding, "run_block", block)
    ctx = JobContext(should_stop=lambda: len(blocks) == 2)  # cancelled halfway
    request = Image2TextInput((ChatMessage("user", "Describe", (picture(6),)),), 4)

    def run() -> Any:
        if path == "alone":
            return deep.infer(request, ctx)
        return deep.infer_batch([request, request], [ctx, ctx])

    with pytest.raises(JobCancelled):
        run()
    assert blocks == [0, 1]


def test_pixels_sent_twice_in_one_request_are_encoded_once(deep: Any) -> None:
    image = picture(5)
    twice = Image2TextInput((ChatMessage("user", "Same?", (image, image.copy())),), 3)
    before = deep.images.encoded  # the vision cache is off: nothing is kept between requests
    output = deep.infer(twice, JobContext())
    assert deep.images.encoded == before + 1
    per_image = int(deep._plan([twice]).items["image"][0].grid.prod()) // 4  # 2x2 patches each
    assert output.prompt_tokens > 2 * per_image  # both markers filled

"""Qwen2.5-VL's model inputs, with each image's (and video's) vision-encoder output kept for reuse.

A user who asks a second question about the same picture, in a new request or a later turn of
the same chat, sends the same pixels again. Their features depend only on the pixels and the
resize bounds, so `ImageEncoder` keeps them by that key (an LRU with a byte cap,
`VISION_CACHE_BYTES`) and a repeat skips the image processor and the encoder (its resize ran
on the CPU pool as it was decoded).

Every image is encoded alone, hit or miss: a kept value is then the same whichever request
first computed it, and answers are identical with the cache on or off. The prompt's image
placeholders are expanded here, as the processor would, and `generate` receives the features
through its `mm_encoder_outputs` argument instead of pixels.

The encoder runs whole for `generate`, or a block at a time (`Encoding`) between the continuous
decoder's steps, within about the work one chunk of prompt costs (`Budget`), so that a request
with large images or a long video delays the running rows by a bounded amount a step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from hunyuan_service.errors import InvalidInput
from hunyuan_service.media import content_digest
from hunyuan_service.models.caches import TensorCache

if TYPE_CHECKING:
    from PIL.Image import Image

    from hunyuan_service.models.types import Video

Bounds = tuple[tuple[str, int], ...]  # qwen_vl_utils' resize bounds, as sorted items
# A templated prompt, its images, its videos, and each image's resize bounds
Row = tuple[str, "Sequence[Image]", "Sequence[Video]", "Sequence[Bounds]"]


def _features(tensors: list[Any]) -> Any:
    """Per-item features as `generate`'s `mm_encoder_outputs` holds an encoder's output."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    # transformers' annotation says one tensor; Qwen's own encoders give a tuple.
    return BaseModelOutputWithPooling(pooler_output=tuple(tensors))  # type: ignore[arg-type]


class ImageEncoder:
    """Builds `generate`'s inputs for templated prompts whose images are given apart.

    `plan` tokenizes the prompts and readies each image's and video's pixels; their encoding
    then runs whole (`VisionPlan.inputs`) or a block at a time between the continuous
    decoder's steps (`VisionPlan.encode`), with the same result.

    Args:
        model: a loaded `Qwen2_5_VLForConditionalGeneration`.
        processor: its processor.
        max_bytes: the cache's cap on the features it keeps; 0 keeps none.
        resize: qwen_vl_utils' resize of one image to the given bounds.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        max_bytes: int,
        resize: Callable[[Image, dict[str, int]], Image],
    ) -> None:
        self.model = model
        self.processor = processor
        self.cache = TensorCache(max_bytes)
        self.resize = resize
        self.encoded = 0  # images through the encoder, for tests and benches

    def plan(self, rows: Sequence[Row]) -> VisionPlan:
        """For rows of (templated prompt, its images, its videos, each image's resize bounds):
        the tokenized prompts (left-padded), with the grids of the images and videos that fill
        each prompt's `<|image_pad|>` and `<|video_pad|>` markers in order, on the model's
        device; their features (under `mm_encoder_outputs`, as `generate` takes them) come
        from the vision cache or from the encoder, which the plan runs when asked."""
        import torch

        processor = self.processor
        image_pad, video_pad = processor.image_token, processor.video_token
        markers = re.compile(f"({re.escape(image_pad)}|{re.escape(video_pad)})")
        merge = processor.image_processor.merge_size**2
        texts = []
        found: dict[str, list[Any]] = {"image": [], "video": [], "image_grid": [], "video_grid": []}
        seconds: list[float] = []  # each video's time per temporal patch, for its positions
        planned: dict[Any, Encoding] = {}  # one encoding for pixels sent twice
        for prompt, row_images, row_videos, bounds in rows:
            pieces = markers.split(prompt)  # text, marker, text, marker, ..., text
            kinds = pieces[1::2]
            if kinds.count(image_pad) != len(row_images) or kinds.count(video_pad) != len(
                row_videos
            ):
                raise InvalidInput(
                    "messages: the image and video markers do not match what was sent",
                    param="messages",
                )
            images, videos, sizes = iter(row_images), iter(row_videos), iter(bounds)
            text = pieces[0]
            for marker, piece in zip(kinds, pieces[2::2], strict=True):
                if marker == image_pad:
                    kind, item = "image", self._image(next(images), next(sizes), planned)
                else:
                    video = next(videos)
                    kind, item = "video", self._video(video, planned)
                    seconds.append(processor.video_processor.temporal_patch_size / video.fps)
                found[kind].append(item)
                found[f"{kind}_grid"].append(item.grid)
                text += marker * (int(item.grid.prod()) // merge) + piece
            texts.append(text)
        tokens = processor.tokenizer(texts, return_tensors="pt", padding=True)
        ids = tokens["input_ids"]
        tokens["mm_token_type_ids"] = torch.tensor(
            processor.create_mm_token_type_ids(ids.tolist()), dtype=ids.dtype
        )
        inputs = dict(tokens.to(self.model.device))
        for kind in ("image", "video"):
            if found[kind]:
                inputs[f"{kind}_grid_thw"] = torch.cat(found[f"{kind}_grid"]).to(self.model.device)
        if seconds:
            inputs["second_per_grid_ts"] = torch.tensor(seconds, device=self.model.device)
        return VisionPlan(inputs, {"image": found["image"], "video": found["video"]})

    def _video(self, video: Video, planned: dict[Any, Encoding]) -> Encoding:
        """One video's encoding, its frames already sampled and sized (videos.py)."""
        import numpy as np
        import torch

        key = ("video", video.digest)
        found = self._known(key, planned)
        if found is not None:
            return found
        frames = torch.stack(
            [
                torch.from_numpy(np.array(frame.convert("RGB"))).permute(2, 0, 1)
                for frame in video.frames
            ]
        )
        pixels = self.processor.video_processor(
            videos=[frames],
            do_sample_frames=False,  # sampled and sized while decoding (videos.py)
            do_resize=False,
            cap_pixels_per_frame=True,  # no effect without resizing; silences its notice
            return_tensors="pt",
            device=self.model.device,
        )
        values, grid = pixels["pixel_values_videos"], pixels["video_grid_thw"]
        planned[key] = Encoding(self, key, values, grid)
        return planned[key]

    def _image(self, image: Image, bounds: Bounds, planned: dict[Any, Encoding]) -> Encoding:
        """One image's encoding: resized (a no-op for images `prepare_image` sized), then
        normalised and cut into patches by the processor on the model's device, so that on a
        GPU the image crosses as bytes rather than as float32 patches (8x larger)."""
        key = (content_digest(image), bounds)
        found = self._known(key, planned)
        if found is not None:
            return found
        resized = self.resize(image, dict(bounds))
        pixels = self.processor.image_processor(
            images=[resized], return_tensors="pt", device=self.model.device
        )
        planned[key] = Encoding(self, key, pixels["pixel_values"], pixels["image_grid_thw"])
        return planned[key]

    def _known(self, key: Any, planned: dict[Any, Encoding]) -> Encoding | None:
        """The encoding of pixels this plan already has, or an encoded one from the cache."""
        if key in planned:
            return planned[key]
        kept = self.cache.get(key)
        if kept is None:
            return None
        grid, features = kept
        planned[key] = Encoding(self, key, None, grid, features)
        return planned[key]


class VisionPlan:
    """Tokenized prompts whose images and videos are encoded when asked: all at once
    (`inputs`), or within a budget of work at a time (`encode`), between decode steps."""

    def __init__(self, inputs: dict[str, Any], items: dict[str, list[Encoding]]) -> None:
        self.partial = inputs  # `generate`'s inputs but the features
        self.items = items  # "image" and "video": one per marker, in the prompt's order
        self.tokens = int(inputs["input_ids"].shape[1])

    @property
    def encodings(self) -> list[Encoding]:
        """Each encoding still to run, once (pixels sent twice share one), in order."""
        items = self.items["image"] + self.items["video"]
        return list(dict.fromkeys(item for item in items if item.features is None))

    def encode(self, budget: Budget | None, check: Callable[[], None] | None = None) -> bool:
        """Runs encoder blocks while `budget` allows (None: all of them); True once every
        image and video is encoded. `check` runs before each block and may raise (a job
        stopped: `JobContext.raise_if_stopped`)."""
        import torch

        with torch.inference_mode():
            for item in self.encodings:
                while item.features is None:
                    if budget is not None and not budget.take(item.next_cost()):
                        return False
                    if check is not None:
                        check()
                    item.run_block()
        return True

    def inputs(self, check: Callable[[], None] | None = None) -> dict[str, Any]:
        """`generate`'s inputs, the images and videos encoded (what `encode` left, now;
        `check` runs before each block, as there)."""
        self.encode(None, check)
        inputs = dict(self.partial)
        encoded = {
            kind: _features([item.features for item in items])
            for kind, items in self.items.items()
            if items
        }
        if encoded:
            inputs["mm_encoder_outputs"] = encoded
        return inputs


class Budget:
    """The encoder work that one turn between two decode steps may do, in multiply-adds: the
    first block of a turn always runs (else an image larger than the budget never would)."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.fresh = True

    def take(self, cost: int) -> bool:
        if not self.fresh and cost > self.left:
            return False
        self.fresh = False
        self.left -= cost
        return True


class Encoding:
    """One image's or video's pass through Qwen2.5-VL's vision encoder, a block at a time.

    Its steps are the encoder's own forward (`Qwen2_5_VisionTransformerPretrainedModel`), the
    same modules on the same inputs in the same order, split at its blocks so that a decode
    step can run between two of them; `tests/e2e/test_vision_stages.py` checks the features
    against the model's `get_image_features` and `get_video_features`. Each block's cost is
    estimated in multiply-adds: its weights times the patches, and its attention (over windows
    of patches, or each frame whole in the full-attention blocks).
    """

    def __init__(
        self, encoder: ImageEncoder, key: Any, pixels: Any, grid: Any, features: Any = None
    ) -> None:
        self.encoder, self.key, self.pixels, self.grid = encoder, key, pixels, grid
        self.features = features  # [tokens, hidden] on the device, once encoded
        self.visual = encoder.model.model.visual
        self.done = 0  # blocks run
        self.state: Any = None  # between blocks: hidden states, rotary tables, windows
        self.order: Any = None  # the patches' order in windows
        self.costs = [] if features is not None else block_costs(self.visual, grid)

    def next_cost(self) -> int:
        return self.costs[self.done]

    def run_block(self) -> None:
        """Runs the next block (the first also embeds the patches, the last also merges them)."""
        if self.state is None:
            self._start()
        hidden, embeddings, windows, whole = self.state
        blocks = self.visual.blocks
        seqlens, longest = whole if self.done in self.visual.fullatt_block_indexes else windows
        hidden = blocks[self.done](
            hidden, cu_seqlens=seqlens, max_seqlen=longest, position_embeddings=embeddings
        )
        self.done += 1
        self.state = (hidden, embeddings, windows, whole)
        if self.done == len(blocks):
            self._finish()

    def _start(self) -> None:
        from transformers.utils.generic import get_max_seqlen
        from transformers.vision_utils import (
            get_vision_attention_seqlens,
            get_vision_position_ids,
            get_vision_window_index,
        )

        visual = self.visual
        grid = self.grid.to(self.encoder.model.device)
        positions = get_vision_position_ids(grid, visual.spatial_merge_size)
        whole = get_vision_attention_seqlens(grid, visual.config)
        self.order, window_seqlens = get_vision_window_index(
            grid,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        windows = (window_seqlens, get_max_seqlen(window_seqlens, visual.config))
        hidden = visual.patch_embed(self.pixels.type(visual.dtype))
        length = hidden.shape[0]
        hidden = visual.permute_input_for_window_attn(hidden, self.order, seq_len=length)
        embeddings = tuple(
            visual.permute_input_for_window_attn(table, self.order, seq_len=length)
            for table in visual.rotary_pos_emb(hidden, positions)
        )
        self.state = (hidden, embeddings, windows, whole)

    def _finish(self) -> None:
        import torch

        hidden = self.state[0]
        self.features = self.visual.merger(hidden)[torch.argsort(self.order), :]
        self.state = self.pixels = None
        self.encoder.encoded += 1
        self.encoder.cache.put(self.key, (self.grid, self.features))


def block_costs(visual: Any, grid: Any) -> list[int]:
    """Each encoder block's multiply-adds for one item of `grid` [1, 3] (t, h, w patches): its
    weights times the patches plus its attention, the first with the patch embedding and the
    last with the merger."""
    frames, height, width = (int(n) for n in grid.reshape(-1).tolist())
    patches = frames * height * width
    hidden = visual.config.hidden_size
    window = (visual.window_size // visual.patch_size) ** 2  # patches a window holds at most
    weights = sum(p.numel() for p in visual.blocks[0].parameters())
    windowed = patches * (weights + 2 * hidden * min(window, height * width))
    whole = patches * (weights + 2 * hidden * height * width)
    costs = [
        whole if index in visual.fullatt_block_indexes else windowed
        for index in range(len(visual.blocks))
    ]
    costs[0] += patches * sum(p.numel() for p in visual.patch_embed.parameters())
    merged = patches // visual.spatial_merge_unit
    costs[-1] += merged * sum(p.numel() for p in visual.merger.parameters())
    return costs

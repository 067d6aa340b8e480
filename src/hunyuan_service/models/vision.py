"""Qwen2.5-VL's model inputs, with each image's (and video's) vision-encoder output kept for reuse.

A user who asks a second question about the same picture, in a new request or a later turn of
the same chat, sends the same pixels again. Their features depend only on the pixels and the
resize bounds, so `ImageEncoder` keeps them by that key (an LRU with a byte cap,
`VISION_CACHE_BYTES`) and a repeat skips the resize, the image processor and the encoder.

Every image is encoded alone, hit or miss: a kept value is then the same whichever request
first computed it, and answers are identical with the cache on or off. The prompt's image
placeholders are expanded here, as the processor would, and `generate` receives the features
through its `mm_encoder_outputs` argument instead of pixels.
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

    def inputs(self, rows: Sequence[Row]) -> Any:
        """For rows of (templated prompt, its images, its videos, each image's resize bounds):
        the tokenized prompts (left-padded), with the grids and features of the images and
        videos that fill each prompt's `<|image_pad|>` and `<|video_pad|>` markers in order
        (features under `mm_encoder_outputs`, as `generate` takes them), on the model's device."""
        import torch

        processor = self.processor
        image_pad, video_pad = processor.image_token, processor.video_token
        markers = re.compile(f"({re.escape(image_pad)}|{re.escape(video_pad)})")
        merge = processor.image_processor.merge_size**2
        texts = []
        found: dict[str, list[Any]] = {"image": [], "video": [], "image_grid": [], "video_grid": []}
        seconds: list[float] = []  # each video's time per temporal patch, for its positions
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
                    kind, (grid, feature) = "image", self._encoded(next(images), next(sizes))
                else:
                    video = next(videos)
                    kind, (grid, feature) = "video", self._encoded_video(video)
                    seconds.append(processor.video_processor.temporal_patch_size / video.fps)
                found[kind].append(feature)
                found[f"{kind}_grid"].append(grid)
                text += marker * (int(grid.prod()) // merge) + piece
            texts.append(text)
        tokens = processor.tokenizer(texts, return_tensors="pt", padding=True)
        ids = tokens["input_ids"]
        tokens["mm_token_type_ids"] = torch.tensor(
            processor.create_mm_token_type_ids(ids.tolist()), dtype=ids.dtype
        )
        inputs = dict(tokens.to(self.model.device))
        encoded = {}
        for kind in ("image", "video"):
            if found[kind]:
                inputs[f"{kind}_grid_thw"] = torch.cat(found[f"{kind}_grid"]).to(self.model.device)
                encoded[kind] = _features(found[kind])
        if seconds:
            inputs["second_per_grid_ts"] = torch.tensor(seconds, device=self.model.device)
        if encoded:
            inputs["mm_encoder_outputs"] = encoded
        return inputs

    def _encoded_video(self, video: Video) -> tuple[Any, Any]:
        """(grid_thw [1, 3] on the CPU, features [tokens, hidden] on the device) of one video,
        whose frames are already sampled and sized (videos.py)."""
        import numpy as np
        import torch

        key = ("video", video.digest)
        found = self.cache.get(key)
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
        encoder = self.model.model.get_video_features
        return self._encode(key, encoder, pixels["pixel_values_videos"], pixels["video_grid_thw"])

    def _encoded(self, image: Image, bounds: Bounds) -> tuple[Any, Any]:
        """(grid_thw [1, 3] on the CPU, features [tokens, hidden] on the device) of one image."""
        key = (content_digest(image), bounds)
        found = self.cache.get(key)
        if found is not None:
            return found
        resized = self.resize(image, dict(bounds))
        pixels = self.processor.image_processor(
            images=[resized], return_tensors="pt", device=self.model.device
        )
        encoder = self.model.model.get_image_features
        return self._encode(key, encoder, pixels["pixel_values"], pixels["image_grid_thw"])

    def _encode(self, key: Any, encoder: Any, pixels: Any, grid: Any) -> tuple[Any, Any]:
        """Runs one image's or video's pixels (normalised on the model's device) through its
        encoder and keeps the result."""
        import torch

        with torch.inference_mode():
            output = encoder(pixels, grid.to(self.model.device), return_dict=True)
        self.encoded += 1
        entry = (grid, output.pooler_output[0])
        self.cache.put(key, entry)
        return entry

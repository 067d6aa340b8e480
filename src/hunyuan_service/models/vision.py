"""Qwen2.5-VL's model inputs, with each image's vision-encoder output kept for reuse.

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

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from hunyuan_service.errors import InvalidInput
from hunyuan_service.media import content_digest
from hunyuan_service.models.caches import TensorCache

if TYPE_CHECKING:
    from PIL.Image import Image

Bounds = tuple[tuple[str, int], ...]  # qwen_vl_utils' resize bounds, as sorted items


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

    def inputs(self, rows: Sequence[tuple[str, Sequence[Image], Bounds]]) -> Any:
        """For rows of (templated prompt, its images, their resize bounds): the tokenized
        prompts (left-padded), with `image_grid_thw` and the features of the images that fill
        each prompt's `<|image_pad|>` markers in order (under `mm_encoder_outputs`, as
        `generate` takes them), all on the model's device."""
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        processor = self.processor
        pad = processor.image_token
        merge = processor.image_processor.merge_size**2
        texts, grids, features = [], [], []
        for prompt, row_images, bounds in rows:
            pieces = prompt.split(pad)
            if len(pieces) != len(row_images) + 1:
                raise InvalidInput(
                    "messages: an image marker does not match the images sent", param="messages"
                )
            text = pieces[0]
            for image, piece in zip(row_images, pieces[1:], strict=True):
                grid, feature = self._encoded(image, bounds)
                grids.append(grid)
                features.append(feature)
                text += pad * (int(grid.prod()) // merge) + piece
            texts.append(text)
        tokens = processor.tokenizer(texts, return_tensors="pt", padding=True)
        ids = tokens["input_ids"]
        tokens["mm_token_type_ids"] = torch.tensor(
            processor.create_mm_token_type_ids(ids.tolist()), dtype=ids.dtype
        )
        inputs = dict(tokens.to(self.model.device))
        if grids:
            inputs["image_grid_thw"] = torch.cat(grids).to(self.model.device)
            inputs["mm_encoder_outputs"] = {
                # transformers' annotation says one tensor; Qwen's own encoder gives a tuple.
                "image": BaseModelOutputWithPooling(pooler_output=tuple(features))  # type: ignore[arg-type]
            }
        return inputs

    def _encoded(self, image: Image, bounds: Bounds) -> tuple[Any, Any]:
        """(grid_thw [1, 3] on the CPU, features [tokens, hidden] on the device) of one image."""
        import torch

        key = (content_digest(image), bounds)
        found = self.cache.get(key)
        if found is not None:
            return found
        resized = self.resize(image, dict(bounds))
        pixels = self.processor.image_processor(images=[resized], return_tensors="pt")
        grid = pixels["image_grid_thw"]
        vision = self.model.model
        with torch.inference_mode():
            output = vision.get_image_features(
                pixels["pixel_values"].to(self.model.device),
                grid.to(self.model.device),
                return_dict=True,
            )
        self.encoded += 1
        entry = (grid, output.pooler_output[0])
        self.cache.put(key, entry)
        return entry

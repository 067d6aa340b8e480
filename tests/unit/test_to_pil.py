"""FLUX's images leave the pipeline as tensors and become 8-bit PIL images on the device: the
pixels must be diffusers' own `output_type="pil"` pixels, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

from hunyuan_service.models.flux import to_pil

ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}  # the bit pattern of 1.0


def values_in_unit_range(dtype: torch.dtype) -> torch.Tensor:
    """Every value of a 16-bit dtype in [0, 1]; for float32 a dense grid and the values nearest
    each rounding tie k + 0.5 after scaling by 255."""
    if dtype in ONE_BITS:
        bits = torch.arange(ONE_BITS[dtype] + 1, dtype=torch.int16)
        return bits.view(dtype)
    grid = torch.linspace(0, 1, 2**16 + 1)
    ties = (torch.arange(255) + 0.5) / 255
    near = torch.cat(
        [torch.nextafter(ties, torch.zeros(1)), ties, torch.nextafter(ties, torch.ones(1))]
    )
    return torch.cat([grid, near])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_to_pil_gives_diffusers_pixels_for_every_value(dtype: torch.dtype) -> None:
    values = values_in_unit_range(dtype)
    width = 64
    values = torch.cat([values, values[: (-len(values)) % (3 * width)]])  # whole rows of 3 channels
    images = values.reshape(1, 3, -1, width).repeat(2, 1, 1, 1)
    images[1] = images[1].flip(-1)
    processor = VaeImageProcessor()
    expected = processor.numpy_to_pil(processor.pt_to_numpy(images))
    made = to_pil(images)
    height = images.shape[2]
    assert [(image.size, image.mode) for image in made] == [((width, height), "RGB")] * 2
    for ours, theirs in zip(made, expected, strict=True):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert set(np.unique(np.asarray(made[0]))) == set(range(256))  # every level is reached

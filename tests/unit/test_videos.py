"""Video sampling and sizing (videos.py), without the model."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from hunyuan_service.errors import InvalidInput
from hunyuan_service.settings import Settings
from hunyuan_service.videos import (
    VideoSampling,
    _check_header,
    decode_video,
    fitted,
    video_tokens,
)
from tests.videos import video_bytes

PATCH_PIXELS = 28 * 28


def settings(**overrides: Any) -> Settings:
    return Settings(_env_file=None, model_type="image2text", model_id="tiny", **overrides)


def test_sizes_are_multiples_of_28_within_the_bounds() -> None:
    assert fitted((640, 480), 4 * PATCH_PIXELS, 100 * PATCH_PIXELS) == (308, 224)
    assert fitted((30, 20), 4 * PATCH_PIXELS, 100 * PATCH_PIXELS) == (84, 56)  # enlarged
    assert fitted((640, 480), 4 * PATCH_PIXELS, 4 * PATCH_PIXELS) == (56, 28)  # the cap wins
    width, height = fitted((4000, 100), 4 * PATCH_PIXELS, 50 * PATCH_PIXELS)
    assert (width % 28, height % 28) == (0, 0)
    assert width * height <= 50 * PATCH_PIXELS


def test_frames_share_the_token_cap_and_are_small_from_the_start() -> None:
    data = video_bytes("mp4", frames=60, size=(640, 480), rate=30)  # 2 s
    video = decode_video(
        data, "videos[0]", settings(max_video_tokens=64), VideoSampling(30.0, 768, 10**6)
    )
    assert len(video.frames) == 60
    assert video_tokens(video) <= 64
    assert {frame.size for frame in video.frames} == {(56, 28)}  # 2 tokens a frame


def test_sampling_takes_one_frame_per_interval_and_an_even_count() -> None:
    data = video_bytes("webm", frames=20, size=(64, 48), rate=10)  # 2 s at 10 fps
    one = decode_video(data, "videos[0]", settings(), VideoSampling(1.0, 768, 10**6))
    assert len(one.frames) == 2  # t = 0 and 1 s
    three = decode_video(data, "videos[0]", settings(), VideoSampling(3.0, 768, 10**6))
    assert len(three.frames) == 6  # t = 0, 1/3, 2/3, 1, 4/3, 5/3
    capped = decode_video(data, "videos[0]", settings(), VideoSampling(10.0, 5, 10**6))
    assert len(capped.frames) == 6  # 5 taken, the last repeated to make pairs
    assert one.digest != three.digest  # the sampling is part of the key


def test_a_header_without_a_frame_size_is_unreadable_not_a_crash() -> None:
    stream = SimpleNamespace(
        codec_context=SimpleNamespace(width=0, height=0), duration=None, time_base=None, frames=0
    )
    with pytest.raises(InvalidInput, match="not a readable video"):
        _check_header(stream, SimpleNamespace(duration=None), "videos[0]", settings())

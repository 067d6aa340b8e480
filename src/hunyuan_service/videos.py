"""Safe video intake for image2text: MP4, WebM and GIF decoded from bytes with PyAV.

PyAV is the library qwen-vl-utils depends on (its torchvision reader decodes through it); the
service never hands a URL or a path to it. Every cost is bounded before or while decoding:
the frame size and the length are read from the header, the frames decoded are counted, and
decoding stops once the sampled frames are taken. A file whose header claims more than the
caps is refused before its first frame is decoded, with a 413 that names the cap.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hunyuan_service.errors import InvalidInput, JobCancelled, PayloadTooLarge
from hunyuan_service.models.types import Video

if TYPE_CHECKING:
    from PIL.Image import Image

    from hunyuan_service.settings import Settings

# Container names as FFmpeg reports them (`mov,mp4,...` and `matroska,webm` cover MP4, MOV and
# WebM); anything else is refused before a frame is read.
ALLOWED_CONTAINERS = {"mp4", "mov", "webm", "matroska", "gif"}
PATCH = 28  # Qwen2.5-VL: 14-pixel patches merged 2x2
TOKENS_PER_FRAME = 768  # qwen-vl-utils' largest frame, in tokens (VIDEO_MAX_TOKEN_NUM)
MIN_FRAME_TOKENS = 4


@dataclass(frozen=True)
class VideoSampling:
    """How a video is sampled: `fps` frames per second of video, at most `max_frames`, each
    resized to at least `min_pixels` and at most `max_pixels` (and its share of
    MAX_VIDEO_TOKENS, which wins over `min_pixels`)."""

    fps: float
    max_frames: int
    max_pixels: int
    min_pixels: int = MIN_FRAME_TOKENS * PATCH**2


def decode_video(
    data: bytes,
    param: str,
    settings: Settings,
    sampling: VideoSampling,
    stop: threading.Event | None = None,
) -> Video:
    """Samples frames from one video file at `sampling.fps`, resized for the model (sides
    multiples of 28, an even count), or raises a 4xx `ServiceError` that names the problem."""
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except Exception:  # FFmpeg's many errors for data it cannot read: the client's file
        raise _unreadable(param) from None
    with container:
        names = set(container.format.name.split(","))
        if not names & ALLOWED_CONTAINERS:
            raise InvalidInput(
                f"{param}: unsupported video format {container.format.name}; send MP4, WebM "
                "or an animated GIF",
                param=param,
            )
        if not container.streams.video:
            raise InvalidInput(f"{param}: the file has no video stream", param=param)
        stream = container.streams.video[0]
        _check_header(stream, container, param, settings)
        frames = _sample(container, stream, param, settings, sampling, stop)
    return Video(
        frames=_resized(frames, sampling, settings),
        fps=sampling.fps,
        digest=_digest(data, sampling),
    )


def _check_header(stream: Any, container: Any, param: str, settings: Settings) -> None:
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:  # a header without a frame size: nothing to size frames by
        raise _unreadable(param)
    if width * height > settings.max_video_frame_pixels:
        raise PayloadTooLarge(
            f"{param}: frames are {width}x{height} pixels; at most "
            f"{settings.max_video_frame_pixels} are allowed (MAX_VIDEO_FRAME_PIXELS)",
            param=param,
        )
    seconds = _duration(stream, container)
    if seconds is not None and seconds > settings.max_video_seconds:
        raise PayloadTooLarge(
            f"{param}: the video is {seconds:.1f} s long; at most {settings.max_video_seconds:g} "
            "s are allowed (MAX_VIDEO_SECONDS): send a shorter clip",
            param=param,
        )
    if stream.frames and stream.frames > settings.max_video_decoded_frames:
        raise PayloadTooLarge(
            f"{param}: the video has {stream.frames} frames; at most "
            f"{settings.max_video_decoded_frames} are decoded (MAX_VIDEO_DECODED_FRAMES): send "
            "a shorter clip or a lower frame rate",
            param=param,
        )


def _duration(stream: Any, container: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000  # av.time_base
    return None


def _sample(
    container: Any,
    stream: Any,
    param: str,
    settings: Settings,
    sampling: VideoSampling,
    stop: threading.Event | None,
) -> list[Image]:
    """The first frame at or after each multiple of 1/fps seconds, decoding in order and no
    further than the last one needed. Each is converted straight to about its model size (the
    share of MAX_VIDEO_TOKENS the expected frame count leaves it), so memory stays bounded
    however large the frames or however many are asked for."""
    seconds_long = _duration(stream, container)
    expected = sampling.max_frames
    if seconds_long is not None:
        expected = max(1, min(expected, int(seconds_long * sampling.fps) + 1))
    width, height = fitted(
        (stream.codec_context.width, stream.codec_context.height),
        sampling.min_pixels,
        _frame_budget(expected, sampling, settings),
    )
    taken: list[Image] = []
    decoded = 0
    start: float | None = None  # the first frame's time: a stream may not begin at 0
    rate = float(stream.average_rate) if stream.average_rate else 25.0
    try:
        for frame in container.decode(stream):
            decoded += 1
            if decoded > settings.max_video_decoded_frames:
                raise PayloadTooLarge(
                    f"{param}: decoding it needs more than {settings.max_video_decoded_frames} "
                    "frames (MAX_VIDEO_DECODED_FRAMES): send a shorter clip or a lower frame rate",
                    param=param,
                )
            if frame.width * frame.height > settings.max_video_frame_pixels:
                raise PayloadTooLarge(
                    f"{param}: a frame is {frame.width}x{frame.height} pixels; at most "
                    f"{settings.max_video_frame_pixels} are allowed (MAX_VIDEO_FRAME_PIXELS)",
                    param=param,
                )
            at = float(frame.time) if frame.time is not None else (decoded - 1) / rate
            start = at if start is None else start
            seconds = at - start
            if seconds > settings.max_video_seconds:  # a stream with no length in its header
                raise PayloadTooLarge(
                    f"{param}: the video runs past {settings.max_video_seconds:g} s "
                    "(MAX_VIDEO_SECONDS): send a shorter clip",
                    param=param,
                )
            if stop is not None and decoded % 32 == 0 and stop.is_set():
                raise JobCancelled("video decoding stopped: the request ended")
            while len(taken) < sampling.max_frames and seconds >= len(taken) / sampling.fps:
                taken.append(frame.to_image(width=width, height=height))
            if len(taken) >= sampling.max_frames:
                break
    except (PayloadTooLarge, JobCancelled):
        raise
    except Exception:  # a truncated or corrupt stream fails mid-decode
        if not taken:
            raise _unreadable(param) from None
        # Frames before the damage are kept, as players show them.
    if not taken:
        raise _unreadable(param)
    return taken


def _resized(frames: list[Image], sampling: VideoSampling, settings: Settings) -> tuple[Image, ...]:
    """Each frame at one size for the model: within the request's pixel budget, Qwen's largest
    frame and a share of MAX_VIDEO_TOKENS, sides multiples of 28; an even count (two frames
    make one temporal patch)."""
    from PIL import Image as PILImage

    if len(frames) % 2:
        frames = [*frames, frames[-1]]
    budget = _frame_budget(len(frames), sampling, settings)
    size = fitted(frames[0].size, sampling.min_pixels, budget)
    return tuple(
        frame if frame.size == size else frame.resize(size, PILImage.Resampling.BICUBIC)
        for frame in (frame.convert("RGB") for frame in frames)
    )


def _frame_budget(count: int, sampling: VideoSampling, settings: Settings) -> int:
    """Pixels of each of `count` frames: within the request's max_pixels, Qwen's largest frame
    and the frames' share of MAX_VIDEO_TOKENS (two frames make one temporal patch)."""
    share = settings.max_video_tokens * 2 // max(count + count % 2, 2)
    tokens = max(MIN_FRAME_TOKENS, min(TOKENS_PER_FRAME, share))
    return max(MIN_FRAME_TOKENS * PATCH**2, min(sampling.max_pixels, tokens * PATCH**2))


def fitted(size: tuple[int, int], min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """`size` with each side a multiple of 28 (at least 28), near its aspect ratio, scaled into
    the pixel bounds as Qwen's own resize rule does; where rounding cannot meet both bounds, at
    most `max_pixels` wins."""
    width, height = size

    def sides(scale: float, rounding: Any) -> tuple[int, int]:
        return (
            max(PATCH, int(rounding(width * scale / PATCH)) * PATCH),
            max(PATCH, int(rounding(height * scale / PATCH)) * PATCH),
        )

    new = sides(1.0, round)
    if new[0] * new[1] < min_pixels:
        new = sides(math.sqrt(min_pixels / (width * height)), math.ceil)
    if new[0] * new[1] > max_pixels:  # the cap wins over the floor
        new = sides(math.sqrt(max_pixels / (width * height)), math.floor)
    return new


def video_tokens(video: Video) -> int:
    """Visual tokens the model reads for it: a token per 28x28 pixels per pair of frames."""
    width, height = video.frames[0].size
    return len(video.frames) // 2 * math.ceil(width / PATCH) * math.ceil(height / PATCH)


def _digest(data: bytes, sampling: VideoSampling) -> bytes:
    digest = hashlib.blake2b(data, digest_size=16)
    digest.update(
        f"{sampling.fps}:{sampling.max_frames}:{sampling.min_pixels}:{sampling.max_pixels}".encode()
    )
    return digest.digest()


def _unreadable(param: str) -> InvalidInput:
    return InvalidInput(
        f"{param}: not a readable video (corrupt, truncated, or not MP4, WebM or GIF)",
        param=param,
    )

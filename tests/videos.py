"""Small videos made in memory for tests: MP4 (MPEG-4 part 2) and WebM (VP8) with PyAV,
animated GIF with Pillow."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np

CODECS = {"mp4": "mpeg4", "webm": "libvpx"}


def frame_pixels(index: int, size: tuple[int, int]) -> np.ndarray:
    """Frame `index`: its own colour, and a white bar that moves."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = ((index * 40) % 256, (index * 90) % 256, 200 - (index * 20) % 200)
    pixels[:, (index * 5) % size[0] :][:, :6] = 255
    return pixels


def video_bytes(
    fmt: str = "mp4", frames: int = 8, size: tuple[int, int] = (64, 48), rate: int = 4
) -> bytes:
    """`frames` frames of `size` (width, height) at `rate` per second, each a different colour
    with a moving bar, so sampled frames differ."""
    import av
    from PIL import Image

    buffer = io.BytesIO()
    if fmt == "gif":
        images = [Image.fromarray(frame_pixels(i, size)) for i in range(frames)]
        images[0].save(
            buffer, "GIF", save_all=True, append_images=images[1:], duration=1000 // rate, loop=0
        )
        return buffer.getvalue()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream(CODECS[fmt], rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, rate)
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_pixels(index, size), format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()

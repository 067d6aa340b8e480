"""Encoding response bodies: images (png, jpeg, webp), and JSON with large values spliced in.

Decoding of client images lives in `media`.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import pybase64
from pydantic_core import to_json

from hunyuan_service.api import png

if TYPE_CHECKING:
    from PIL.Image import Image

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# Quality 95 for the lossy formats. WebP at libwebp's fastest method: at 1024x1024 it took a
# third to a half of the default method's time (bench/encoding.py: 31-34 ms against 98 on a
# photo-like image, 95 against 176 on noise) for files up to 7% larger. PNG goes through
# Pillow only for the modes `png.py` does not take.
_OPTIONS: dict[str, dict[str, int]] = {
    "jpeg": {"quality": 95},
    "webp": {"quality": 95, "method": 0},
    "png": {"compress_level": 1},
}


def encode_image(image: Image, fmt: str) -> bytes:
    """Encodes `image` as png, jpeg or webp; CPU-bound, so call it from a thread."""
    if fmt == "png" and png.can_encode(image):
        return png.encode_png(image)
    buffer = io.BytesIO()
    if fmt == "jpeg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image.save(buffer, format=_PIL_FORMATS[fmt], **_OPTIONS[fmt])
    return buffer.getvalue()


def base64_json_string(data: bytes) -> bytes:
    """Bytes as a base64 JSON string literal. Base64 needs no escaping, so this is plain
    concatenation, not a scan by `json.dumps`. pybase64 (SIMD) encodes a 3 MB image in about
    0.1 ms, the standard library in about 5 ms."""
    return b'"' + pybase64.b64encode(data) + b'"'


def json_bytes(body: Any) -> bytes:
    """Compact UTF-8 JSON, as Starlette's JSONResponse writes it.

    pydantic-core's encoder is used rather than `json.dumps`: it took a fifth of the time for the
    16 KB answers of the overhead benchmark (21 against 96 microseconds). A NaN becomes null.
    """
    return to_json(body, inf_nan_mode="null")


def json_object(fields: dict[str, Any], raw: dict[str, bytes]) -> bytes:
    """A JSON object whose `raw` values are already JSON text, spliced in as bytes.

    For images in base64: `json.dumps` over a multi-megabyte string takes ~17 ms and holds the
    GIL throughout, so it stalls the event loop even when run on another thread.
    """
    parts = [json_bytes(key) + b":" + value for key, value in raw.items()]
    parts += [json_bytes(key) + b":" + json_bytes(value) for key, value in fields.items()]
    return b"{" + b",".join(parts) + b"}"


def server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{name.removesuffix('_ms')};dur={value}" for name, value in timings.items())

"""Image encoding for responses (decoding of client images lives in `media`)."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(image: Image, fmt: str) -> bytes:
    """Encodes `image` as png, jpeg or webp; CPU-bound, so call it from a thread."""
    buffer = io.BytesIO()
    if fmt == "jpeg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    options = {"quality": 95} if fmt in ("jpeg", "webp") else {}
    image.save(buffer, format=_PIL_FORMATS[fmt], **options)
    return buffer.getvalue()


def base64_json_string(image: Image, fmt: str) -> bytes:
    """The encoded image as a JSON string literal. Base64 needs no escaping, so this is plain
    concatenation, not a scan by `json.dumps`. CPU-bound: call it from a thread."""
    return b'"' + base64.b64encode(encode_image(image, fmt)) + b'"'

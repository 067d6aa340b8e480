"""Safe image intake: every client image is fetched, decoded and checked here, never downstream.

Accepted forms are data URIs, plain base64, uploaded bytes, URLs on the operator's allowlist, and
paths inside the operator's allowed folder. Everything here is blocking and CPU-bound or I/O-bound,
so routes call it from a thread pool. Each refusal is a `ServiceError` with a 4xx status.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import ipaddress
import math
import os
import socket
import stat
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urljoin, urlsplit

import pybase64

from hunyuan_service.errors import InvalidInput, JobCancelled, PayloadTooLarge, ServiceError
from hunyuan_service.models.types import PixelRange
from hunyuan_service.videos import VideoSampling, decode_video

if TYPE_CHECKING:
    from PIL.Image import Image

    from hunyuan_service.settings import Settings

ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}
MAX_REDIRECTS = 3


class MediaNotAllowed(ServiceError):
    status_code = 403
    error_type = "invalid_request_error"
    code = "media_not_allowed"


@dataclass(frozen=True)
class ImageSource:
    """One client image before decoding: a string (URI, base64, URL, path) or uploaded bytes."""

    value: str | bytes
    param: str  # where it came from, for error messages: "images[0]"
    mask: bool = False  # an inpainting mask: decoded to one channel by `decode_mask`
    video: VideoSampling | None = None  # a video, sampled so by `decode_video`
    pixels: PixelRange = (None, None)  # an image's resize bounds for the model; None: the server's


def load_images(
    sources: list[ImageSource],
    settings: Settings,
    stop: threading.Event | None = None,
    max_pixels: int | None = None,
    max_count: int | None = None,
    max_ratio: int | None = None,
    prepare: Callable[[Image, PixelRange, str], Image] | None = None,
) -> list[Any]:
    """Fetches, decodes, validates and normalises every image (and video: a `Video` in its
    place); raises a 4xx `ServiceError`.

    `stop`, once set (the request was answered or its client left), ends the work before the
    next image. Images over `max_pixels` (VL_MAX_PIXELS unless given) are downscaled; more than
    `max_count` images and videos (MAX_INPUT_IMAGES unless given) are refused, and so is an
    image longer than `max_ratio` times its width or wider than that times its height. Each
    image then goes through `prepare` with its resize bounds and its name (the model's
    `prepare_image`).
    """
    limit = max_count or settings.max_input_images
    if len(sources) > limit:
        raise InvalidInput(
            f"{len(sources)} images and videos sent; at most {limit} are allowed",
            param="videos" if sources[-1].video is not None else "images",
        )
    images: list[Any] = []
    for source in sources:
        if stop is not None and stop.is_set():
            raise JobCancelled("image decoding stopped: the request ended")
        data = read_source(source, settings)
        if source.video is not None:
            images.append(decode_video(data, source.param, settings, source.video, stop))
        elif source.mask:
            images.append(decode_mask(data, source.param, settings, max_pixels))
        else:
            image = decode_image(data, source.param, settings, max_pixels)
            if max_ratio is not None and max(image.size) > max_ratio * min(image.size):
                raise InvalidInput(
                    f"{source.param}: image is {image.width}x{image.height} pixels; the model "
                    f"takes sides at most {max_ratio} times each other: crop or pad it",
                    param=source.param,
                )
            if prepare is not None:
                image = prepare(image, source.pixels, source.param)
            images.append(image)
    return images


def read_source(source: ImageSource, settings: Settings) -> bytes:
    """Returns the raw bytes of one image or video, enforcing the byte cap and the media
    policy."""
    value, param = source.value, source.param
    limit = settings.max_video_bytes if source.video is not None else settings.max_image_bytes
    if isinstance(value, bytes):
        return _capped(value, limit, param)
    text = value.strip()
    if not text:
        raise InvalidInput(f"{param}: empty image", param=param)
    lowered = text[:16].lower()
    if lowered.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or ";base64" not in header.lower():
            kind = "video/mp4" if source.video is not None else "image/..."
            raise InvalidInput(f"{param}: a data URI must be 'data:{kind};base64,...'", param=param)
        return _b64decode(payload, limit, param)
    if lowered.startswith(("http://", "https://")):
        return fetch_url(text, settings, param, limit)
    if lowered.startswith("file://"):
        return read_local(text[len("file://") :], settings, param, limit)
    decoded = _try_b64(text, limit, param)
    if decoded is not None:
        return decoded
    return read_local(text, settings, param, limit)


def _capped(data: bytes, limit: int, param: str) -> bytes:
    if len(data) > limit:
        raise PayloadTooLarge(
            f"{param}: image is {len(data)} bytes; at most {limit} are allowed", param=param
        )
    return data


def _b64decode(payload: str, limit: int, param: str) -> bytes:
    """Strict base64 (pybase64: SIMD, about 50x the standard library's speed), where
    whitespace (line breaks every 76 characters, as `base64` writes them) is ignored."""
    # Check the encoded length first, so an oversized image is refused before it is decoded.
    if len(payload) > math.ceil(limit / 3) * 4 + 8:
        raise PayloadTooLarge(f"{param}: image is over {limit} bytes", param=param)
    try:
        data = pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        try:  # whitespace, or no base64 at all: again without whitespace (~0.5 ms a MB)
            data = pybase64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{param}: invalid base64 data", param=param) from None
    return _capped(data, limit, param)


def _try_b64(text: str, limit: int, param: str) -> bytes | None:
    """Plain base64, told apart from a path: an image path has a dot, which base64 never has;
    None where `text` is no base64. Whitespace is ignored, as in `_b64decode`."""
    if len(text) < 16 or "." in text:
        return None
    try:
        return _b64decode(text, limit, param)
    except InvalidInput:
        return None


# -- local files -----------------------------------------------------------------------------


def read_local(path_text: str, settings: Settings, param: str, limit: int | None = None) -> bytes:
    """Reads a server-local file, only from inside ALLOWED_LOCAL_MEDIA_DIR (symlinks resolved)."""
    limit = limit or settings.max_image_bytes
    root = settings.allowed_local_media_dir
    if root is None:
        raise MediaNotAllowed(
            f"{param}: server-local paths are disabled; send the image as base64, a data URI or "
            "a multipart upload (operators: set ALLOWED_LOCAL_MEDIA_DIR)",
            param=param,
        )
    if "\x00" in path_text:
        raise InvalidInput(f"{param}: a path cannot contain a NUL byte", param=param)
    # Relative paths are taken from the server's working directory, as the reference server did.
    real = Path(os.path.realpath(Path(path_text).expanduser()))
    if real != root and root not in real.parents:
        raise MediaNotAllowed(f"{param}: path is outside the allowed media folder", param=param)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer. The type is checked on the open
        # file, not before opening, so a file swapped in between cannot slip through.
        descriptor = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            raise InvalidInput(f"{param}: not a regular file", param=param)
        with os.fdopen(descriptor, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise PayloadTooLarge(
                    f"{param}: file is {size} bytes; at most {limit} are allowed", param=param
                )
            return handle.read(limit + 1)
    except FileNotFoundError:
        raise InvalidInput(
            f"{param}: no such file in the allowed media folder", param=param
        ) from None
    except OSError:
        raise InvalidInput(f"{param}: cannot read that file", param=param) from None


# -- remote URLs -----------------------------------------------------------------------------


def host_allowed(host: str, allowlist: list[str]) -> bool:
    """Exact match, or any subdomain for entries written '.example.com' or '*.example.com'."""
    host = host.lower().rstrip(".")
    for entry in allowlist:
        if entry.startswith(("*.", ".")):
            suffix = entry.lstrip("*")
            if host.endswith(suffix):
                return True
        elif host == entry:
            return True
    return False


def vetted_address(
    host: str,
    port: int,
    *,
    allow_private: bool,
    param: str,
    setting: str = "ALLOW_PRIVATE_MEDIA_ADDRESSES",
) -> str:
    """Resolves `host` and returns an address to connect to, refusing internal ones.

    Every resolved address is checked, and the connection then goes to the checked address, so a
    second DNS answer (DNS rebinding) cannot redirect it to an internal one. `setting` names the
    operator's switch in the refusal.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise InvalidInput(f"{param}: cannot resolve host {host!r}", param=param) from None
    addresses = [_unmapped(ipaddress.ip_address(str(info[4][0]).split("%")[0])) for info in infos]
    if not allow_private:
        for address in addresses:
            if not address.is_global or address.is_multicast:
                raise MediaNotAllowed(
                    f"{param}: {host} resolves to a private, loopback, link-local or reserved "
                    f"address, which is refused (operators: {setting})",
                    param=param,
                )
    return str(addresses[0])


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _unmapped(address: IPAddress) -> IPAddress:
    """Judges an IPv6 address that carries an IPv4 one by the IPv4 address it stands for.

    IPv4-mapped (::ffff:127.0.0.1), IPv4-compatible (::7f00:1), NAT64 (64:ff9b::7f00:1), 6to4
    (2002:7f00:1::) and Teredo all reach the embedded address through a gateway or the stack.
    """
    if not isinstance(address, ipaddress.IPv6Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in NAT64 or (address in IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def fetch_url(url: str, settings: Settings, param: str, limit: int | None = None) -> bytes:
    """Fetches an image from an allowlisted host with timeouts, a byte cap and vetted redirects."""
    import httpx

    if not settings.allowed_media_domains:
        raise MediaNotAllowed(
            f"{param}: remote URLs are disabled; send the image itself "
            "(operators: set ALLOWED_MEDIA_DOMAINS)",
            param=param,
        )
    # MEDIA_FETCH_TIMEOUT_S bounds the whole fetch, redirects included: a host that trickles one
    # byte a second must not hold a decoding thread for longer.
    deadline = time.monotonic() + settings.media_fetch_timeout_s
    limit = limit or settings.max_image_bytes
    late = InvalidInput(
        f"{param}: fetching the URL took longer than {settings.media_fetch_timeout_s:g} s "
        "(MEDIA_FETCH_TIMEOUT_S)",
        param=param,
    )
    with httpx.Client(follow_redirects=False, trust_env=False) as client:
        for _hop in range(MAX_REDIRECTS + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise late
            if any(ord(char) < 33 for char in url):
                raise InvalidInput(f"{param}: the URL contains a control character", param=param)
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018  (raises ValueError for a port out of range)
            except ValueError as error:
                raise InvalidInput(f"{param}: not a valid URL ({error})", param=param) from None
            host = parts.hostname or ""
            if parts.scheme not in ("http", "https") or not host:
                raise MediaNotAllowed(f"{param}: only http(s) URLs are fetched", param=param)
            if not host_allowed(host, settings.allowed_media_domains):
                raise MediaNotAllowed(
                    f"{param}: host {host!r} is not in ALLOWED_MEDIA_DOMAINS", param=param
                )
            port = parts.port or (443 if parts.scheme == "https" else 80)
            address = vetted_address(
                host, port, allow_private=settings.allow_private_media_addresses, param=param
            )
            literal = f"[{address}]" if ":" in address else address
            target = parts._replace(netloc=f"{literal}:{port}").geturl()
            headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"}
            try:
                with client.stream(
                    "GET",
                    target,
                    headers=headers,
                    timeout=httpx.Timeout(left),
                    extensions={"sni_hostname": host},
                ) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise InvalidInput(
                            f"{param}: fetching the URL gave HTTP {response.status_code}",
                            param=param,
                        )
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > limit:
                        raise PayloadTooLarge(
                            f"{param}: remote image is over {limit} bytes", param=param
                        )
                    chunks, size = [], 0
                    for chunk in response.iter_bytes():
                        if time.monotonic() > deadline:
                            raise late
                        size += len(chunk)
                        if size > limit:
                            raise PayloadTooLarge(
                                f"{param}: remote image is over {limit} bytes", param=param
                            )
                        chunks.append(chunk)
                    return b"".join(chunks)
            except httpx.TimeoutException:
                raise late from None
            except httpx.HTTPError as error:
                raise InvalidInput(
                    f"{param}: fetching the URL failed ({type(error).__name__})", param=param
                ) from None
    raise InvalidInput(f"{param}: too many redirects", param=param)


# -- decoding --------------------------------------------------------------------------------


def decode_image(
    data: bytes, param: str, settings: Settings, max_pixels: int | None = None
) -> Image:
    """Decodes one image safely and returns it as RGB, within a pixel budget (`max_pixels`,
    else the processor's, VL_MAX_PIXELS).

    The pixel count is read from the header and checked before any pixel is decoded, so a small
    file that declares 50,000 x 50,000 pixels costs nothing.
    """
    budget = max_pixels or settings.vl_max_pixels
    decoded = _downscale(_to_rgb(_open(data, param, settings, budget)), budget)
    # The key of its vision-encoder output, made here in the CPU pool from the file's bytes
    # (one hash of a compressed file, not of the pixels) and what decoding made of them.
    digest = hashlib.blake2b(data, digest_size=16)
    digest.update(f"file:{decoded.mode}:{decoded.width}x{decoded.height}".encode())
    decoded.info[DIGEST_KEY] = (id(decoded), digest.digest())
    return decoded


def decode_mask(
    data: bytes, param: str, settings: Settings, max_pixels: int | None = None
) -> Image:
    """Decodes an inpainting mask, safely, to one channel where 255 means repaint; downscaled
    as `decode_image` would downscale an image of its size. A mask with transparent pixels is
    read as OpenAI's are (transparent: repaint); an opaque one by brightness (white: repaint)."""
    from PIL import ImageOps

    budget = max_pixels or settings.vl_max_pixels
    image = _open(data, param, settings, budget)
    alpha = None
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
        low, _high = cast("tuple[int, int]", alpha.getextrema())
        if low == 255:  # opaque throughout (a canvas saves an alpha of 255s): by brightness
            alpha = None
    mask = ImageOps.invert(alpha) if alpha is not None else _to_rgb(image).convert("L")
    return _downscale(mask, budget)


def _open(data: bytes, param: str, settings: Settings, max_pixels: int) -> Image:
    """Opens and loads one image, refusing a format, size or file that would cost too much.

    A JPEG that `_downscale` will shrink to `max_pixels` is decoded at the smallest of
    libjpeg's scales (1/2, 1/4, 1/8) that still covers that size: 12-megapixel photos took
    0.37-0.47 of the time of a full decode then resize, within 51 dB PSNR of its result
    (bench/intake.py).
    """
    from PIL import Image as PILImage

    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is the check that matters; Pillow's warning is noise.
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            image = PILImage.open(io.BytesIO(data))
            image_format = image.format or "unknown"
            if image_format not in ALLOWED_FORMATS:
                raise InvalidInput(
                    f"{param}: unsupported image format {image_format}; send "
                    "PNG, JPEG, WebP, GIF, BMP or TIFF",
                    param=param,
                )
            if image_format == "JPEG":
                _check_jpeg_scans(data, param)
            width, height = image.size
            if width * height > settings.max_image_pixels:
                raise PayloadTooLarge(
                    f"{param}: image is {width}x{height} pixels; at most "
                    f"{settings.max_image_pixels} pixels are allowed",
                    param=param,
                )
            image.seek(0)  # an animated image is read as its first frame
            if image_format == "JPEG":
                image.draft(image.mode, _downscaled_size(image.size, max_pixels))
            image.load()
            return image
    except ServiceError:
        raise
    except PILImage.DecompressionBombError:
        # Pillow refuses absurd sizes (over twice its own limit) while reading the header.
        raise PayloadTooLarge(
            f"{param}: image declares too many pixels; at most {settings.max_image_pixels} "
            "pixels are allowed",
            param=param,
        ) from None
    except Exception:  # PIL raises many types for corrupt data; none of them is the server's fault
        raise InvalidInput(
            f"{param}: not a readable image (corrupt, truncated or not an image file)",
            param=param,
        ) from None


# Where `decode_image` keeps an image's digest, the key of its vision-encoder output.
DIGEST_KEY = "hunyuan_digest"


def with_digest_of(derived: Image, source: Image) -> Image:
    """`derived` (made from `source` by a step that depends on nothing else but what the
    caller's cache key holds) under `source`'s content digest, so that it is not hashed again."""
    derived.info[DIGEST_KEY] = (id(derived), content_digest(source))
    return derived


def content_digest(image: Image) -> bytes:
    """A digest of the image's content: of its file, kept when `decode_image` made it (equal
    files decode to equal pixels), else of its pixels, size and mode."""
    found = image.info.get(DIGEST_KEY)
    # Pillow copies `info` into images derived from this one: the digest names its owner.
    if isinstance(found, tuple) and found[0] == id(image):
        return bytes(found[1])
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(f"{image.mode}:{image.width}x{image.height}".encode())
    return digest.digest()


# Each scan of a progressive JPEG is decoded over the whole image: a small file that repeats
# one scan thousands of times costs seconds of CPU per request. Encoders write about 10.
MAX_JPEG_SCANS = 64


def _check_jpeg_scans(data: bytes, param: str) -> None:
    """Counts start-of-scan markers (0xFFDA) before decoding. Entropy-coded data escapes 0xFF
    as 0xFF00, so the pair only ever appears as a real marker."""
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise InvalidInput(
            f"{param}: a JPEG with {scans} scans; at most {MAX_JPEG_SCANS} are accepted "
            "(re-save it as a baseline JPEG, or as PNG)",
            param=param,
        )


def _to_rgb(image: Image) -> Image:
    from PIL import Image as PILImage

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16- and 32-bit greyscale: scale to 8 bits rather than clip at 255.
        peak = 65535 if image.mode.startswith("I;16") else 2**32 - 1
        image = image.point(lambda value: value * (255 / peak)).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = PILImage.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


# Images at most this much over VL_MAX_PIXELS are left to the model's own resize (to multiples
# of 28 within the budget), which follows anyway: one resize of about the same size instead of
# two. A 1024x1024 image is 1.045x the default budget.
RESIZE_ONCE_UP_TO = 1.25


def _downscale(image: Image, max_pixels: int) -> Image:
    """Shrinks a large image here in the CPU pool, so queued requests hold bounded memory and
    the model thread resizes no more than about its budget."""
    from PIL import Image as PILImage

    size = _downscaled_size(image.size, max_pixels)
    if size is None:
        return image
    return image.resize(size, PILImage.Resampling.BICUBIC)


def _downscaled_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int] | None:
    """The size `_downscale` gives an image of `size`; None where it leaves it as it is."""
    width, height = size
    if width * height <= max_pixels * RESIZE_ONCE_UP_TO:
        return None
    scale = math.sqrt(max_pixels / (width * height))
    return (max(1, int(width * scale)), max(1, int(height * scale)))

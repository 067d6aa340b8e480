"""The service's own PNG encoder: every decoder must read back exactly the pixels it was given."""

from __future__ import annotations

import io
import random
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from hunyuan_service.api.encoding import encode_image
from hunyuan_service.api.png import adler32_combine, encode_png, run_in_threads


def noise(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    channels = len(mode)
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of each chunk, checking every CRC on the way."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    found, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        found.append((kind, body))
        offset += 12 + length
    return found


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("size", [(1, 1), (1, 7), (7, 1), (33, 17), (257, 130)])
@pytest.mark.parametrize("bands", [1, 2, 3, 4, 200])
def test_pillow_reads_back_every_pixel(mode: str, size: tuple[int, int], bands: int) -> None:
    image = noise(mode, size, seed=bands)
    decoded = Image.open(io.BytesIO(encode_png(image, bands)))
    decoded.load()
    assert (decoded.format, decoded.mode, decoded.size) == ("PNG", mode, size)
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_bands_make_one_zlib_stream_whose_checksum_zlib_verifies() -> None:
    encoded = encode_png(noise("RGB", (64, 40)), bands=4)
    kinds = [kind for kind, _ in chunks(encoded)]
    assert kinds == [b"IHDR", b"IDAT", b"IDAT", b"IDAT", b"IDAT", b"IEND"]
    stream = b"".join(body for kind, body in chunks(encoded) if kind == b"IDAT")
    raw = zlib.decompress(stream)  # raises on a wrong Adler-32
    assert len(raw) == 40 * (1 + 64 * 3)
    assert raw[:: 1 + 64 * 3] == bytes([1]) * 40  # every row uses the Sub filter


def test_smooth_images_compress_like_pillow_at_level_one() -> None:
    x = np.linspace(0, 255, 512)
    pixels = np.stack(
        [np.add.outer(x, x) / 2, np.add.outer(x, -x) / 2 + 128, x[None, :] + 0 * x[:, None]],
        axis=-1,
    )
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    ours = len(encode_png(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    assert ours < 3 * 512 * 512 / 10  # a gradient compresses more than tenfold
    assert ours < 1.5 * len(buffer.getvalue())


@pytest.mark.parametrize("trial", range(20))
def test_adler32_combine_equals_the_checksum_of_the_concatenation(trial: int) -> None:
    rng = random.Random(trial)
    data = rng.randbytes(rng.randrange(0, 200_000))
    cut = rng.randrange(0, len(data) + 1)
    first, second = data[:cut], data[cut:]
    combined = adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second))
    assert combined == zlib.adler32(data)


def test_run_in_threads_keeps_order_uses_other_threads_and_reraises() -> None:
    names: dict[int, str] = {}

    def square(item: int) -> int:
        names[item] = threading.current_thread().name
        return item * item

    assert run_in_threads(square, range(5)) == [0, 1, 4, 9, 16]
    assert names[0] == threading.current_thread().name
    assert len(set(names.values())) == 5

    def fails(item: int) -> int:
        if item == 2:
            raise ValueError("band 2")
        return item

    with pytest.raises(ValueError, match="band 2"):
        run_in_threads(fails, range(4))


def test_encode_image_uses_pillow_for_other_modes() -> None:
    image = Image.new("P", (20, 10), 3)
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
    decoded = Image.open(io.BytesIO(encode_image(image, "png")))
    assert (decoded.format, decoded.mode, decoded.size) == ("PNG", "P", (20, 10))
    assert decoded.convert("RGB").getpixel((5, 5)) == (0, 0, 255)

"""A fast, lossless PNG encoder for the service's 8-bit images, on several cores at once.

Pillow's PNG encoder chooses a filter for each row adaptively (mostly Paeth, the costliest):
102-136 ms for a 1024x1024 image at zlib level 1 on the development machine, more than the 2%
of a GPU request that the whole service may add. With one cheap filter for every row, the same
zlib level takes under half that time on one core. This encoder applies the "Sub" filter (each
byte minus the same channel of the pixel to its left) to all rows with numpy, and deflates
horizontal bands of rows on separate threads, since numpy and the compressor release the GIL on
large buffers. Each band's deflate stream ends on a byte boundary (a sync flush), so the bands
concatenate into one valid zlib stream; their Adler-32 checksums combine arithmetically. The
compressor is Intel's ISA-L (the `isal` package): in this encoder it takes a third to a tenth
of zlib's time at zlib's fastest level, and its files are no larger. The file is standard PNG
(RFC 2083); any decoder reads it. `bench/encoding.py` measures it.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from isal import isal_zlib

if TYPE_CHECKING:
    from PIL.Image import Image

T = TypeVar("T")

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}  # Pillow mode -> PNG colour type, 8 bits each
LEVEL = 1  # of ISA-L's levels 0-3, the fastest and the smallest on bench/encoding.py's images
BAND_BYTES = 512 * 1024  # below this much image data per band, another thread is not worth it
MAX_BANDS = 4  # a 1024x1024 image took 8.5 ms in 2 bands (13 ms in one); more would add little
SUB_FILTER = 1
DEFLATE: Any = isal_zlib  # zlib's interface; bench/encoding.py swaps in zlib for comparison
ADLER_BASE = 65521


def can_encode(image: Image) -> bool:
    return image.mode in COLOUR_TYPES


def encode_png(image: Image, bands: int | None = None) -> bytes:
    """`image` (mode L, RGB or RGBA) as PNG bytes; `bands` defaults to what the cores allow."""
    import numpy as np

    pixels = np.asarray(image)
    height, width = image.height, image.width
    channels = len(image.mode)
    rows = pixels.reshape(height, width * channels)
    if bands is None:
        bands = min(MAX_BANDS, usable_cores(), max(1, rows.nbytes // BAND_BYTES))
    bands = max(1, min(bands, height))
    edges = [height * index // bands for index in range(bands + 1)]

    def deflate(band: int) -> tuple[bytes, int, int]:
        filtered = _sub_filtered(rows[edges[band] : edges[band + 1]], channels)
        compressor = DEFLATE.compressobj(LEVEL, DEFLATE.DEFLATED, -DEFLATE.MAX_WBITS)
        last = band == bands - 1
        data = compressor.compress(filtered)
        data += compressor.flush(DEFLATE.Z_FINISH if last else DEFLATE.Z_SYNC_FLUSH)
        return data, DEFLATE.adler32(filtered), len(filtered)

    parts = run_in_threads(deflate, range(bands))
    checksum = 1  # the Adler-32 of nothing
    for _, band_checksum, length in parts:
        checksum = adler32_combine(checksum, band_checksum, length)
    # The zlib stream: a header (deflate, 32 KiB window, fastest), the bands, the checksum;
    # split over one IDAT chunk per band, which decoders read as one stream.
    idats = [data for data, _, _ in parts]
    idats[0] = b"\x78\x01" + idats[0]
    idats[-1] += struct.pack(">I", checksum)
    header = struct.pack(">IIBBBBB", width, height, 8, COLOUR_TYPES[image.mode], 0, 0, 0)
    chunks = [_chunk(b"IHDR", header), *(_chunk(b"IDAT", data) for data in idats)]
    return SIGNATURE + b"".join(chunks) + _chunk(b"IEND", b"")


def adler32_combine(first: int, second: int, second_length: int) -> int:
    """The Adler-32 of A + B from those of A and of B (B being `second_length` bytes long)."""
    shift = second_length % ADLER_BASE
    low = ((first & 0xFFFF) + (second & 0xFFFF) - 1) % ADLER_BASE
    high = ((first >> 16) + (second >> 16) + shift * (first & 0xFFFF) - shift) % ADLER_BASE
    return (high << 16) | low


def run_in_threads(function: Callable[[int], T], items: Sequence[int]) -> list[T]:
    """`[function(item) for item in items]`, the first on this thread and each other on its own.

    Short-lived threads rather than a pool: callers already run on the engine's CPU pool, so
    waiting there on tasks queued behind them could deadlock, and a module-level pool would be
    process-wide state. Starting a thread costs about 0.1 ms against ~10 ms of work per band.
    """
    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            results[index] = function(items[index])
        except BaseException as error:  # re-raised on the calling thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(1, len(items))]
    for thread in threads:
        thread.start()
    work(0)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _sub_filtered(rows: Any, channels: int) -> bytes:
    """Each row as PNG filter type 1 ("Sub"): a type byte, then each byte minus its left one."""
    import numpy as np

    height, row_bytes = rows.shape
    out = np.empty((height, row_bytes + 1), dtype=np.uint8)
    out[:, 0] = SUB_FILTER
    out[:, 1 : channels + 1] = rows[:, :channels]
    np.subtract(rows[:, channels:], rows[:, :-channels], out=out[:, channels + 1 :])  # mod 256
    return out.tobytes()


def _chunk(kind: bytes, data: bytes) -> bytes:
    checksum = DEFLATE.crc32(data, DEFLATE.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", checksum)


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # honours taskset and cpusets; Linux only
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1

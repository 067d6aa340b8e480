"""Decoding a client's photo: the service's `decode_image` against a full decode then resize.

A phone photo (12 megapixels, JPEG) is about twelve times the image2text pixel budget
(VL_MAX_PIXELS, about a megapixel). `decode_image` asks libjpeg to decode such a JPEG at a
reduced scale (1/2, 1/4 or 1/8) that still covers the budget, then resizes; before 2026-12-07 it
decoded every pixel and resized from there, which this script does as the baseline. Photo-like
images at a few sizes, JPEG quality 90; interleaved rounds, medians; the PSNR of the service's
result against the baseline's.

Then what the model thread does to each decoded image before its image processor: qwen_vl_utils'
resize to multiples of 28 within the bounds, which until 2026-12-07 ran there while every row of
a continuous batch waited; now `prepare_image` runs it on the CPU pool at intake and the model
thread finds the image sized.

    uv run python bench/intake.py [--rounds 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.encoding, run as a script

from bench.encoding import photo_like
from hunyuan_service.media import _downscaled_size, decode_image
from hunyuan_service.settings import Settings

SIZES = ((4000, 3000), (3024, 4032), (1920, 1080))


def full_decode(data: bytes, budget: int) -> Image.Image:
    """Every pixel decoded, then `decode_image`'s own resize to the budget (the service until
    2026-12-07)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    size = _downscaled_size(image.size, budget)
    return image if size is None else image.resize(size, Image.Resampling.BICUBIC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    settings = Settings(_env_file=None, model_type="image2text")
    budget = settings.vl_max_pixels
    print(f"budget (VL_MAX_PIXELS): {budget} pixels")
    decoded: dict[str, Image.Image] = {}
    print("| photo | JPEG KB | full decode + resize, ms | decode_image, ms | ratio | PSNR dB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for width, height in SIZES:
        photo = photo_like(max(width, height)).resize((width, height), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", quality=90)
        data = buffer.getvalue()
        ways = {
            "full": lambda data=data: full_decode(data, budget),
            "service": lambda data=data: decode_image(data, "image", settings),
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, decode in ways.items():
                start = time.perf_counter()
                for _ in range(args.repeats):
                    decode()
                times[name].append((time.perf_counter() - start) / args.repeats)
        ours, theirs = ways["service"](), ways["full"]()
        if ours.size != theirs.size:
            theirs = theirs.resize(ours.size, Image.Resampling.BICUBIC)
        error = np.asarray(ours, dtype=float) - np.asarray(theirs, dtype=float)
        mse = float(np.mean(error**2))
        psnr = "identical" if mse == 0 else f"{10 * math.log10(255**2 / mse):.1f}"
        full_ms, ours_ms = (statistics.median(times[name]) * 1000 for name in ("full", "service"))
        print(
            f"| {width}x{height} | {len(data) // 1000} | {full_ms:.1f} | {ours_ms:.1f} | "
            f"{ours_ms / full_ms:.2f} | {psnr} |"
        )
        decoded[f"{width}x{height}"] = ours
    model_thread(decoded, settings, args.rounds, args.repeats)


def model_thread(
    decoded: dict[str, Image.Image], settings: Settings, rounds: int, repeats: int
) -> None:
    """The model thread's resize of each decoded image: as it came from decoding (before), and
    as `prepare_image` leaves it (now); and `prepare_image` itself, on the CPU pool."""
    from hunyuan_service.models.qwen_vl import QwenVLModel, _resize

    model = QwenVLModel(settings)  # no weights: its resize needs only the settings
    bounds = model._pixel_bounds(None)
    print("\n| decoded photo | model thread before, ms | CPU pool now, ms | model thread now, ms |")
    print("| --- | --- | --- | --- |")
    for name, image in decoded.items():
        prepared = model.prepare_image(image, (None, None))
        ways = {
            "before": lambda image=image: _resize(image, bounds),
            "pool": lambda image=image: model.prepare_image(image, (None, None)),
            "now": lambda prepared=prepared: _resize(prepared, bounds),
        }
        times: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(rounds):
            for way, run in ways.items():
                start = time.perf_counter()
                for _ in range(repeats):
                    run()
                times[way].append((time.perf_counter() - start) / repeats)
        ms = {way: statistics.median(values) * 1000 for way, values in times.items()}
        print(f"| {name} | {ms['before']:.2f} | {ms['pool']:.2f} | {ms['now']:.3f} |")


if __name__ == "__main__":
    main()

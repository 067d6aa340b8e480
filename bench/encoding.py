"""Image encoding time: the service's encoders against Pillow's, on the same images in one run.

What a 1024x1024 text2image answer spends on the CPU after the model: encoding the PNG, then
base64. Two images: a synthetic photo-like one (smooth colour fields, finer texture and sensor-
like noise), and uniform noise, which is what the tiny random-weight model returns and the worst
case for compression. The service's encoder runs with its compressor (ISA-L) and with zlib's,
which it used until 2026-12-07. Each encoder runs `--repeats` times per round, rounds
interleaved; medians. Then the lossy formats: JPEG, and WebP at the service's method and at
Pillow's default.

Last, the whole answer over HTTP: the service's `/infer` (JSON with the image in base64, as
bench/gpu.py's HTTP rows ask for it) with a FLUX model class whose `infer` returns one of these
images at once, so the round trip is what the service adds to the model for such an image.

    uv run python bench/encoding.py [--size 1024] [--rounds 5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from hunyuan_service.api import png
from hunyuan_service.api.encoding import base64_json_string
from hunyuan_service.api.png import encode_png, usable_cores

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.gpu, run as a script


def photo_like(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)

    def upscaled(cells: int, amplitude: float) -> np.ndarray:
        small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        big = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
        return (np.asarray(big, dtype=np.float32) - 128) * amplitude

    pixels = (
        128 + upscaled(12, 0.9) + upscaled(size // 8, 0.15) + rng.normal(0, 1.5, (size, size, 3))
    )
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def noise(size: int, seed: int = 1) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def pillow(level: int) -> Callable[[Image.Image], bytes]:
    def encode(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()

    return encode


ISAL = png.DEFLATE


def with_zlib(encode: Callable[[Image.Image], bytes]) -> Callable[[Image.Image], bytes]:
    """`encode` with zlib as the service's compressor, as before ISA-L."""

    def encode_with_zlib(image: Image.Image) -> bytes:
        png.DEFLATE = zlib
        try:
            return encode(image)
        finally:
            png.DEFLATE = ISAL

    return encode_with_zlib


def lossy_formats(images: dict[str, Image.Image], rounds: int, repeats: int) -> None:
    """The service's JPEG and WebP against WebP at Pillow's default method (what it used until
    2026-12-07); medians of interleaved rounds."""
    from hunyuan_service.api.encoding import encode_image

    def webp_default(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="WEBP", quality=95)
        return buffer.getvalue()

    encoders: dict[str, Callable[[Image.Image], bytes]] = {
        "service, JPEG quality 95": lambda image: encode_image(image, "jpeg"),
        "WebP quality 95, Pillow's default method 4 (before)": webp_default,
        "service, WebP quality 95, method 0": lambda image: encode_image(image, "webp"),
    }
    print("\n| image | encoder | ms | KB |")
    print("| --- | --- | --- | --- |")
    for name, image in images.items():
        times: dict[str, list[float]] = {label: [] for label in encoders}
        sizes = {label: len(encode(image)) for label, encode in encoders.items()}
        for _ in range(rounds):
            for label, encode in encoders.items():
                start = time.perf_counter()
                for _ in range(repeats):
                    encode(image)
                times[label].append((time.perf_counter() - start) / repeats)
        for label, values in times.items():
            ms = statistics.median(values) * 1000
            print(f"| {name} | {label} | {ms:.1f} | {sizes[label] / 1000:.0f} |")


def over_http(images: dict[str, Image.Image], rounds: int, repeats: int) -> None:
    """Medians of `/infer` round trips, in process as bench/gpu.py's HTTP rows run them."""
    import httpx

    from bench.gpu import Plan, serve, settings_for
    from hunyuan_service.api.app import create_app
    from hunyuan_service.models.flux import FluxModel
    from hunyuan_service.models.types import Text2ImageOutput

    class Instant(FluxModel):
        image = noise(16)

        def load(self) -> None:
            pass

        def warm_up(self) -> None:
            pass

        def infer(self, request: object, ctx: object) -> Text2ImageOutput:
            return Text2ImageOutput(images=(self.image,), seed=1, num_inference_steps=1)

    settings = settings_for("text2image", Plan(device="cpu", tiny=False, quick=True, budget_s=0))
    model = Instant(settings)
    cases = [("16x16 noise (the floor)", noise(16), "png", ISAL)]
    for name, image in images.items():
        cases += [
            (f"{name}, PNG with zlib (before)", image, "png", zlib),
            (f"{name}, PNG", image, "png", ISAL),
            (f"{name}, JPEG", image, "jpeg", ISAL),
        ]
    times: dict[str, list[float]] = {label: [] for label, *_ in cases}
    sizes: dict[str, int] = {}
    body = {"prompt": "a lighthouse", "width": 1024, "height": 1024, "num_inference_steps": 1}
    with serve(create_app(settings, model)) as url, httpx.Client(timeout=60) as client:
        for _ in range(rounds):
            for label, image, fmt, deflate in cases:
                model.image, png.DEFLATE = image, deflate
                for _ in range(repeats):
                    start = time.perf_counter()
                    response = client.post(f"{url}/infer", json={**body, "output_format": fmt})
                    times[label].append(time.perf_counter() - start)
                    response.raise_for_status()
                sizes[label] = len(response.content)
    png.DEFLATE = ISAL
    print(f"\n/infer over HTTP, a model that answers at once: {rounds} rounds of {repeats}, median")
    print("| answer | ms | body MB |")
    print("| --- | --- | --- |")
    for label, values in times.items():
        print(f"| {label} | {statistics.median(values) * 1000:.1f} | {sizes[label] / 1e6:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    encoders: dict[str, Callable[[Image.Image], bytes]] = {
        "Pillow, zlib level 6 (Pillow's default)": pillow(6),
        "Pillow, zlib level 1": pillow(1),
        "service with zlib, one band": with_zlib(lambda image: encode_png(image, bands=1)),
        "service with zlib, bands for these cores (before)": with_zlib(encode_png),
        "service, one band": lambda image: encode_png(image, bands=1),
        "service, bands for these cores": encode_png,
    }
    print(f"{args.size}x{args.size} RGB, {usable_cores()} usable cores")
    images = {"photo-like": photo_like(args.size), "noise": noise(args.size)}
    for name, image in images.items():
        reference = np.asarray(image)
        times: dict[str, list[float]] = {label: [] for label in encoders}
        sizes: dict[str, int] = {}
        for label, encode in encoders.items():  # once untimed, and check it is lossless
            data = encode(image)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), reference), label
            sizes[label] = len(data)
        for _ in range(args.rounds):
            for label, encode in encoders.items():
                start = time.perf_counter()
                for _ in range(args.repeats):
                    encode(image)
                times[label].append((time.perf_counter() - start) / args.repeats)
        start = time.perf_counter()
        for _ in range(args.repeats):
            base64_json_string(encode_png(image))
        with_base64 = (time.perf_counter() - start) / args.repeats
        before_label = "service with zlib, bands for these cores (before)"
        before = statistics.median(times[before_label])
        print(f"\n{name}: median of {args.rounds} rounds of {args.repeats}")
        print("| encoder | ms | vs the service before | MB | size vs before |")
        print("| --- | --- | --- | --- | --- |")
        before_size = sizes[before_label]
        for label, values in times.items():
            ms = statistics.median(values)
            print(
                f"| {label} | {ms * 1000:.1f} | {ms / before:.2f} | {sizes[label] / 1e6:.2f} "
                f"| {sizes[label] / before_size:.2f} |"
            )
        print(f"service encoder plus base64: {with_base64 * 1000:.1f} ms")
    lossy_formats(images, args.rounds, args.repeats)
    over_http(images, args.rounds, args.repeats)


if __name__ == "__main__":
    main()

"""Image decoding and the URL policy, without the model."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from hunyuan_service.errors import InvalidInput, PayloadTooLarge
from hunyuan_service.media import (
    ImageSource,
    MediaNotAllowed,
    decode_image,
    host_allowed,
    load_images,
    read_source,
    vetted_address,
)
from tests.fakes import fake_settings
from tests.images import bomb_png, encoded, png_bytes
from tests.recording import RecordingServer

SETTINGS = fake_settings(model_type="image2text", vl_max_pixels=200_000)


@pytest.mark.parametrize(
    ("image", "fmt"),
    [
        (Image.new("RGBA", (40, 30), (255, 0, 0, 0)), "PNG"),
        (Image.new("LA", (40, 30), (128, 255)), "PNG"),
        (Image.new("P", (40, 30), 3), "PNG"),
        (Image.new("L", (40, 30), 100), "PNG"),
        (Image.new("CMYK", (40, 30), (0, 255, 0, 0)), "JPEG"),
        (Image.new("I;16", (40, 30), 60000), "PNG"),
        (Image.new("RGB", (40, 30), (1, 2, 3)), "WEBP"),
        (Image.new("RGB", (40, 30), (1, 2, 3)), "BMP"),
        (Image.new("RGB", (40, 30), (1, 2, 3)), "TIFF"),
    ],
)
def test_every_mode_becomes_rgb(image: Image.Image, fmt: str) -> None:
    decoded = decode_image(encoded(image, fmt), "images[0]", SETTINGS)
    assert decoded.mode == "RGB"
    assert decoded.size == (40, 30)


def test_transparent_pixels_become_white_not_black() -> None:
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert decode_image(encoded(clear, "PNG"), "i", SETTINGS).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    grey = Image.new("I;16", (4, 4), 32768)
    pixel = decode_image(encoded(grey, "PNG"), "i", SETTINGS).getpixel((0, 0))
    assert isinstance(pixel, tuple)
    red, green, blue = pixel
    assert red == green == blue
    assert 120 <= red <= 135


def test_animated_image_uses_its_first_frame() -> None:
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    first = decode_image(gif, "i", SETTINGS).getpixel((5, 5))
    assert first[0] > 200
    assert first[2] < 50


def test_large_photo_is_downscaled_to_the_pixel_budget() -> None:
    image = decode_image(encoded(Image.new("RGB", (4000, 3000)), "JPEG"), "i", SETTINGS)
    width, height = image.size
    assert width * height <= 200_000
    assert abs(width / height - 4 / 3) < 0.02


def gradient_photo(size: tuple[int, int]) -> Image.Image:
    import numpy as np

    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    channels = [x * 255 // size[0], y * 255 // size[1], (x + y) * 127 // (size[0] + size[1])]
    noise = np.random.default_rng(0).integers(0, 12, (size[1], size[0], 3))
    return Image.fromarray((np.stack(channels, -1) + noise).clip(0, 255).astype("uint8"), "RGB")


@pytest.mark.parametrize(
    ("mode", "options"),
    [("RGB", {}), ("RGB", {"progressive": True}), ("L", {}), ("CMYK", {})],
)
def test_a_large_jpeg_is_decoded_at_a_reduced_scale_to_about_the_full_decodes_pixels(
    monkeypatch: pytest.MonkeyPatch, mode: str, options: dict[str, Any]
) -> None:
    import math

    import numpy as np

    import hunyuan_service.media as media

    photo = gradient_photo((1600, 1200)).convert(mode)
    data = encoded(photo, "JPEG", quality=92, **options)
    shrunk_from: list[tuple[int, int]] = []
    downscale = media._downscale

    def recording(image: Image.Image, max_pixels: int) -> Image.Image:
        shrunk_from.append(image.size)
        return downscale(image, max_pixels)

    monkeypatch.setattr(media, "_downscale", recording)
    image = decode_image(data, "i", SETTINGS)  # 1.92 million pixels into a 200,000 budget
    # decoded at 1/2 scale (1/4 would fall below the 516x387 the budget allows), then resized
    assert shrunk_from == [(800, 600)]
    assert image.mode == "RGB"
    # The full decode, resized the same way, as before: the same size, nearly the same pixels.
    full = Image.open(io.BytesIO(data)).convert("RGB").resize(image.size, Image.Resampling.BICUBIC)
    error = np.asarray(image, dtype=float) - np.asarray(full, dtype=float)
    assert 10 * math.log10(255**2 / np.mean(error**2)) > 35  # dB


def test_a_jpeg_within_the_budget_is_decoded_whole() -> None:
    photo = gradient_photo((480, 400))  # 0.96x the budget
    image = decode_image(encoded(photo, "JPEG", quality=92), "i", SETTINGS)
    assert image.size == (480, 400)


def test_an_image_slightly_over_the_budget_is_resized_once_by_the_model_alone() -> None:
    # 480 x 480 is 1.15x the 200,000 pixels of SETTINGS: qwen_vl_utils' resize follows anyway.
    source = Image.effect_noise((480, 480), 60).convert("RGB")
    image = decode_image(encoded(source, "PNG"), "i", SETTINGS)
    assert image.size == (480, 480)
    assert image.tobytes() == source.tobytes()
    larger = decode_image(encoded(source.resize((520, 520)), "PNG"), "i", SETTINGS)
    assert larger.width * larger.height <= 200_000  # 1.35x: shrunk while decoding


def test_bomb_is_refused_from_its_header() -> None:
    # Decoding 50,000 x 50,000 pixels would need 7.5 GB; the refusal comes from the header alone.
    with pytest.raises(PayloadTooLarge, match="too many pixels"):
        decode_image(bomb_png(), "images[0]", SETTINGS)


def test_header_pixel_count_above_the_limit_is_413_not_422() -> None:
    with pytest.raises(PayloadTooLarge, match="10000x10000 pixels"):
        decode_image(bomb_png(10_000, 10_000), "images[0]", SETTINGS)


def test_pixel_limit_applies_below_pillow_own_bomb_limit() -> None:
    strict = fake_settings(max_image_pixels=10_000)
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode_image(png_bytes((200, 100)), "images[0]", strict)


@pytest.mark.parametrize(
    "data", [b"", b"hello world", b"GIF89a" + b"\0" * 10, png_bytes()[:60], b"<svg></svg>"]
)
def test_garbage_is_invalid_input(data: bytes) -> None:
    with pytest.raises(InvalidInput):
        decode_image(data, "images[0]", SETTINGS)


def test_unsupported_format_is_named() -> None:
    ico = encoded(Image.new("RGB", (16, 16)), "ICO")
    with pytest.raises(InvalidInput, match="unsupported image format ICO"):
        decode_image(ico, "images[0]", SETTINGS)


def test_oversized_base64_is_refused_before_decoding() -> None:
    small = fake_settings(max_image_bytes=2048)
    with pytest.raises(PayloadTooLarge):
        read_source(ImageSource("A" * 10_000, "images[0]"), small)


def test_too_many_images() -> None:
    sources = [ImageSource(png_bytes(), f"images[{i}]") for i in range(9)]
    with pytest.raises(InvalidInput, match="at most 8"):
        load_images(sources, SETTINGS)


@pytest.mark.parametrize(
    ("host", "allowlist", "allowed"),
    [
        ("example.com", ["example.com"], True),
        ("EXAMPLE.com.", ["example.com"], True),
        ("cdn.example.com", ["example.com"], False),
        ("cdn.example.com", [".example.com"], True),
        ("cdn.example.com", ["*.example.com"], True),
        ("evilexample.com", ["*.example.com"], False),
        ("example.com.evil.org", ["example.com"], False),
    ],
)
def test_host_allowlist(host: str, allowlist: list[str], allowed: bool) -> None:
    assert host_allowed(host, allowlist) is allowed


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "169.254.169.254", "10.1.2.3"])
def test_internal_addresses_are_refused(host: str) -> None:
    with pytest.raises(MediaNotAllowed):
        vetted_address(host, 80, allow_private=False, param="images[0]")


def test_internal_addresses_pass_when_the_operator_allows_them() -> None:
    assert vetted_address("127.0.0.1", 80, allow_private=True, param="images[0]") == "127.0.0.1"


@pytest.mark.parametrize(
    "host",
    [
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::7f00:1",  # IPv4-compatible
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254, the metadata address
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2002:a00:1::",  # 6to4 of 10.0.0.1
    ],
)
def test_ipv6_forms_that_embed_an_internal_ipv4_are_refused(host: str) -> None:
    with pytest.raises(MediaNotAllowed):
        vetted_address(host, 80, allow_private=False, param="images[0]")


def test_ipv6_embedding_a_public_ipv4_is_judged_by_it() -> None:
    assert vetted_address("2002:808:808::", 80, allow_private=False, param="p") == "8.8.8.8"


OPEN = fake_settings(
    model_type="image2text", allowed_media_domains=["example.com"], vl_max_pixels=200_000
)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://example.com:99999/a.png", "not a valid URL"),
        ("http://[::1/a.png", "not a valid URL"),
        ("http://exa\x00mple.com/a.png", "control character"),
        ("http://example.com/a b.png", "control character"),
    ],
)
def test_malformed_urls_are_a_clear_4xx(url: str, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        read_source(ImageSource(url, "images[0]"), OPEN)
    assert message in caught.value.message
    assert caught.value.status_code == 422


def test_plain_base64_with_line_breaks_is_base64_not_a_path() -> None:
    import base64
    import textwrap

    wrapped = "\n".join(textwrap.wrap(base64.b64encode(png_bytes()).decode(), 76))
    assert read_source(ImageSource(wrapped, "images[0]"), SETTINGS) == png_bytes()
    spaced = " ".join(textwrap.wrap(base64.b64encode(png_bytes()).decode(), 40))
    assert read_source(ImageSource(spaced, "images[0]"), SETTINGS) == png_bytes()


@pytest.mark.parametrize("data_uri", [False, True])
def test_base64_without_whitespace_is_decoded_once(
    monkeypatch: pytest.MonkeyPatch, data_uri: bool
) -> None:
    import base64

    import pybase64

    decoded: list[int] = []
    original = pybase64.b64decode

    def counted(text: Any, *args: Any, **kwargs: Any) -> bytes:
        decoded.append(len(text))
        return original(text, *args, **kwargs)

    monkeypatch.setattr(pybase64, "b64decode", counted)
    text = base64.b64encode(png_bytes()).decode()
    if data_uri:
        text = "data:image/png;base64," + text
    assert read_source(ImageSource(text, "images[0]"), SETTINGS) == png_bytes()
    assert len(decoded) == 1


def test_local_paths_with_a_nul_byte_are_refused(tmp_path: Path) -> None:
    settings = fake_settings(model_type="image2text", allowed_local_media_dir=tmp_path)
    with pytest.raises(InvalidInput) as caught:
        read_source(ImageSource(f"{tmp_path}/a\x00.png", "images[0]"), settings)
    assert "NUL byte" in caught.value.message


def test_a_fifo_in_the_media_folder_is_refused_at_once_not_waited_on(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would wait for a writer
    settings = fake_settings(model_type="image2text", allowed_local_media_dir=tmp_path)
    with pytest.raises(InvalidInput) as caught:
        read_source(ImageSource(str(tmp_path / "pipe.png"), "images[0]"), settings)
    assert "not a regular file" in caught.value.message
    (tmp_path / "ok.png").write_bytes(png_bytes())
    assert read_source(ImageSource(str(tmp_path / "ok.png"), "images[0]"), settings) == png_bytes()


def test_the_fetch_timeout_bounds_the_whole_fetch_not_each_read() -> None:
    import socket
    import threading
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    done = threading.Event()

    def trickle() -> None:  # one byte every 20 ms, forever: each read is quick, the whole is not
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n")
            while not done.is_set():
                try:
                    connection.sendall(b"x")
                except OSError:
                    return
                time.sleep(0.02)

    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    settings = fake_settings(
        model_type="image2text",
        allowed_media_domains=["127.0.0.1"],
        allow_private_media_addresses=True,
        media_fetch_timeout_s=0.5,
    )
    try:
        with pytest.raises(InvalidInput) as caught:
            read_source(ImageSource(f"http://127.0.0.1:{port}/slow.png", "images[0]"), settings)
    finally:
        done.set()
        listener.close()
    assert caught.value.message == (
        "images[0]: fetching the URL took longer than 0.5 s (MEDIA_FETCH_TIMEOUT_S)"
    )


def repeated_scan_jpeg(repeats: int) -> bytes:
    """A progressive JPEG whose last scan is repeated: valid, small, and slow to decode."""
    progressive = encoded(Image.new("RGB", (64, 64), (120, 40, 200)), "JPEG", progressive=True)
    last_scan = progressive.rindex(b"\xff\xda")
    end = progressive.rindex(b"\xff\xd9")
    return progressive[:end] + progressive[last_scan:end] * repeats + progressive[end:]


def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding() -> None:
    with pytest.raises(InvalidInput) as caught:
        decode_image(repeated_scan_jpeg(5000), "images[0]", SETTINGS)
    assert caught.value.message.startswith("images[0]: a JPEG with 50")
    assert "at most 64 are accepted" in caught.value.message


def test_ordinary_progressive_jpegs_still_decode() -> None:
    assert decode_image(repeated_scan_jpeg(3), "images[0]", SETTINGS).size == (64, 64)


# -- the fetcher's promises, against a resolver the test controls -----------------------------


class Resolver:
    """Stands in for DNS in `socket.getaddrinfo`: each name gets its answers in turn (the last
    one repeats), and a pretend public address is routed to a loopback server, since no public
    address is reachable here. Anything else goes to the real resolver."""

    def __init__(self, real: Any, names: dict[str, list[str]], routes: dict[str, str]) -> None:
        self.real, self.names, self.routes = real, names, routes
        self.asked: list[str] = []

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        self.asked.append(host)
        if host in self.names:
            answers = self.names[host]
            address = answers.pop(0) if len(answers) > 1 else answers[0]
        elif host in self.routes:
            address = self.routes[host]
        else:
            return self.real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port)))]


PUBLIC = "93.184.216.34"  # a global address, routed to the test's server by the resolver


@pytest.fixture
def servers() -> Iterator[tuple[RecordingServer, RecordingServer]]:
    """The images host on 127.0.0.1, and an "internal" one on 127.0.0.2 at the same port."""
    images = RecordingServer()
    internal = RecordingServer(host="127.0.0.2", port=images.port)
    yield images, internal
    images.close()
    internal.close()


def fetch_settings(**overrides: Any) -> Any:
    return fake_settings(model_type="image2text", allowed_media_domains=[".test"], **overrides)


def test_the_connection_goes_to_the_address_that_was_checked(
    servers: tuple[RecordingServer, RecordingServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    images, internal = servers
    # DNS rebinding: the first answer is public and passes the check; any later lookup of the
    # same name would lead to the internal server.
    resolver = Resolver(
        socket.getaddrinfo, {"images.test": [PUBLIC, "127.0.0.2"]}, {PUBLIC: "127.0.0.1"}
    )
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    url = f"http://images.test:{images.port}/red.png"
    assert read_source(ImageSource(url, "images[0]"), fetch_settings()) == png_bytes()
    assert images.paths == ["/red.png"]
    assert images.hosts == [f"images.test:{images.port}"]  # the name, though the IP was dialled
    assert internal.paths == []
    assert resolver.asked.count("images.test") == 1


def test_a_redirect_to_a_private_address_is_refused_before_connecting(
    servers: tuple[RecordingServer, RecordingServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    images, internal = servers
    resolver = Resolver(
        socket.getaddrinfo,
        {"images.test": [PUBLIC], "intranet.test": ["127.0.0.2"], "meta.test": ["169.254.169.254"]},
        {PUBLIC: "127.0.0.1"},
    )
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    for name in ("intranet.test", "meta.test"):
        url = f"http://images.test:{images.port}/redirect-to/http://{name}:{images.port}/red.png"
        with pytest.raises(MediaNotAllowed) as caught:
            read_source(ImageSource(url, "images[0]"), fetch_settings())
        assert caught.value.message == (
            f"images[0]: {name} resolves to a private, loopback, link-local or reserved address, "
            "which is refused (operators: ALLOW_PRIVATE_MEDIA_ADDRESSES)"
        )
    assert internal.paths == []  # never connected to
    assert len(images.paths) == 2  # the first hop of each was fetched, then refused


@pytest.mark.parametrize(("redirects", "fetched"), [(3, True), (4, False)])
def test_at_most_three_redirects_are_followed(
    servers: tuple[RecordingServer, RecordingServer],
    monkeypatch: pytest.MonkeyPatch,
    redirects: int,
    fetched: bool,
) -> None:
    images, _internal = servers
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        Resolver(socket.getaddrinfo, {"images.test": [PUBLIC]}, {PUBLIC: "127.0.0.1"}),
    )
    path = "/redirect-to/" * redirects + "/red.png"
    url = f"http://images.test:{images.port}{path}"
    source = ImageSource(url, "images[0]")
    if fetched:
        assert read_source(source, fetch_settings()) == png_bytes()
        assert images.paths[-1] == "/red.png"
    else:
        with pytest.raises(InvalidInput) as caught:
            read_source(source, fetch_settings())
        assert caught.value.message == "images[0]: too many redirects"
        assert "/red.png" not in images.paths
    # The first request and the redirects followed; with four, the fourth is never followed.
    assert len(images.paths) == min(redirects, 3) + 1

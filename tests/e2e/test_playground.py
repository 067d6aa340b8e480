"""The playground page in a real browser (Debian's chromium through Playwright), on the tiny models.

`.ci/run` installs chromium; where it is missing (a bare development machine) these tests skip
and say so.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from hunyuan_service.api.app import create_app
from tests.conftest import LiveServer
from tests.e2e.conftest import tiny_settings
from tests.images import png_bytes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="needs Debian's chromium: apt-get install chromium"
    ),
]
# SCREENSHOT_DIR=docs refreshes the README's screenshots; otherwise they go to a temporary folder.
SHOTS = os.environ.get("SCREENSHOT_DIR")
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def flux_site(tiny_cache: Path) -> Iterator[str]:
    with LiveServer(create_app(tiny_settings("text2image", tiny_cache))) as server:
        yield server.url


@pytest.fixture(scope="module")
def vl_site(tiny_cache: Path) -> Iterator[str]:
    with LiveServer(create_app(tiny_settings("image2text", tiny_cache))) as server:
        yield server.url


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    return Path(SHOTS) if SHOTS else tmp_path


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    problems: list[str] = []
    # A 422 is a handled outcome (shown next to its field), not a problem of the page.
    page.on(
        "console",
        lambda m: problems.append(m.text) if m.type == "error" and "422" not in m.text else None,
    )
    page.on("pageerror", lambda error: problems.append(str(error)))
    yield page
    context.close()
    assert problems == []  # no script errors, no CSP violations


def open_ready(page: Any, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=60_000)


def generate(page: Any, prompt: str, **fields: str) -> None:
    """Fills the text2image form (Width, Height, Steps, Seed by label) and presses Generate."""
    page.get_by_label("Prompt").fill(prompt)
    for label, value in fields.items():
        page.get_by_label(label).fill(value)
    page.get_by_role("button", name="Generate").click()


def test_text2image_generates_an_image_of_the_requested_size(
    page: Any, flux_site: str, shots: Path
) -> None:
    open_ready(page, flux_site)
    generate(page, "a lighthouse at dusk", Width="96", Height="64", Steps="6", Seed="42")
    page.wait_for_selector("#image-result:not([hidden])", timeout=120_000)
    assert page.locator("#image-progress").evaluate("bar => [bar.value, bar.max]") == [6, 6]
    assert page.locator("#text2image").get_attribute("data-steps-seen") == "6"
    assert page.locator("#result-seed").inner_text() == "seed 42"
    source = page.locator("#result-image").get_attribute("src")
    image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
    assert image.size == (96, 64)
    assert page.locator("#result-download").get_attribute("download") == "hunyuan-42.png"
    page.screenshot(path=str(shots / "playground-text2image.png"), full_page=True)
    page.set_viewport_size(PHONE)
    page.screenshot(path=str(shots / "playground-text2image-phone.png"), full_page=True)


def test_a_422_is_shown_next_to_its_field(page: Any, flux_site: str) -> None:
    open_ready(page, flux_site)
    generate(page, "a fox", Width="100")  # not a multiple of 16
    error = page.locator('.field-error[data-for="width"]')
    error.wait_for(timeout=60_000)
    assert error.inner_text() == "width: must be a multiple of 16 (got 100)"
    assert page.get_by_label("Width").get_attribute("aria-invalid") == "true"
    assert page.locator("#image-result").is_hidden()


def test_cancel_stops_the_running_job_on_the_server(page: Any, flux_site: str) -> None:
    open_ready(page, flux_site)
    # 100 steps at 1024x1024: far from done when Cancel is pressed after the first step.
    generate(page, "a long one", Width="1024", Height="1024", Steps="100")
    page.locator("#text2image[data-steps-seen]").wait_for(timeout=120_000)  # a step has run
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_selector("#message:not([hidden])", timeout=60_000)
    assert page.locator("#message").inner_text() == "Stopped."

    def cancelled_running() -> int:
        metrics = httpx.get(flux_site + "/metrics").text
        found = re.search(r'outcome="cancelled_running_client_disconnected"} (\d+)', metrics)
        return int(found.group(1)) if found else 0

    polls = 0
    while cancelled_running() < 1:  # the server sees the abort at its next step
        polls += 1
        assert polls < 3000, "the server never cancelled the running job"
        page.wait_for_timeout(100)
    assert page.locator("#image-result").is_hidden()
    assert int(page.locator("#text2image").get_attribute("data-steps-seen")) < 100


def test_image2text_streams_the_answer_for_uploaded_images(
    page: Any, vl_site: str, tmp_path: Path, shots: Path
) -> None:
    picture = tmp_path / "square.png"
    picture.write_bytes(png_bytes())
    open_ready(page, vl_site)
    page.get_by_label("Images", exact=True).set_input_files([str(picture), str(picture)])
    assert page.locator("#thumbnails img").count() == 2
    page.get_by_role("button", name="remove square.png").first.click()
    assert page.locator("#thumbnails img").count() == 1
    page.get_by_label("Images", exact=True).set_input_files([str(picture)])
    assert page.locator("#thumbnails img").count() == 2
    page.get_by_label("Question").fill("What is in this picture?")
    page.get_by_label("Max new tokens").fill("12")
    page.get_by_role("button", name="Ask").click()
    page.wait_for_selector("#answer[data-done=true]", timeout=120_000)
    answer = page.locator("#answer")
    assert int(answer.get_attribute("data-pieces")) >= 2  # token events, shown as they came
    assert answer.get_attribute("data-streamed") == answer.evaluate("e => e.textContent")
    page.screenshot(path=str(shots / "playground-image2text.png"), full_page=True)
    page.set_viewport_size(PHONE)
    page.screenshot(path=str(shots / "playground-image2text-phone.png"), full_page=True)


def test_the_page_asks_for_the_key_and_sends_it(page: Any, tiny_cache: Path) -> None:
    settings = tiny_settings("text2image", tiny_cache, api_key="sesame-123")
    with LiveServer(create_app(settings)) as server:
        open_ready(page, server.url)
        assert page.locator("#key-form").is_visible()
        page.get_by_label("API key").fill("sesame-123")
        page.get_by_role("button", name="Use this key").click()
        assert page.evaluate("sessionStorage.getItem('hunyuan-service-api-key')") == "sesame-123"
        assert "sesame" not in page.url
        generate(page, "a key", Width="64", Height="64", Steps="2")
        page.wait_for_selector("#image-result:not([hidden])", timeout=120_000)


def test_a_painted_mask_repaints_only_where_it_was_painted(
    page: Any, flux_site: str, tmp_path: Path, shots: Path
) -> None:
    import numpy as np

    rng = np.random.default_rng(3)
    source = Image.fromarray(rng.integers(0, 256, (128, 192, 3), dtype=np.uint8))
    picture = tmp_path / "photo.png"
    source.save(picture)
    open_ready(page, flux_site)
    page.get_by_text("Start from an image").click()
    page.get_by_label("Image to edit").set_input_files(str(picture))
    page.wait_for_selector("#mask-editor:not([hidden])", timeout=60_000)
    assert page.get_by_label("Width").input_value() == "192"  # the image's own size
    assert page.get_by_label("Height").input_value() == "128"
    box = page.locator("#mask-canvas").bounding_box()
    scale = box["width"] / 192
    page.mouse.move(box["x"] + 20 * scale, box["y"] + 20 * scale)
    page.mouse.down()
    for y in range(20, 110, 10):  # a stroke down the left part of the image (x 20 to 50)
        page.mouse.move(box["x"] + 20 * scale, box["y"] + y * scale, steps=3)
        page.mouse.move(box["x"] + 50 * scale, box["y"] + y * scale, steps=3)
    page.mouse.up()
    assert page.locator("#mask-canvas").get_attribute("data-painted") == "true"
    generate(page, "a red door", Steps="4", Seed="5")
    page.wait_for_selector("#image-result:not([hidden])", timeout=120_000)
    found = page.locator("#result-image").get_attribute("src")
    result = np.asarray(Image.open(io.BytesIO(base64.b64decode(found.split(",", 1)[1]))))
    original = np.asarray(source)
    assert result.shape == original.shape
    assert np.array_equal(result[:, 96:], original[:, 96:])  # never painted: as sent
    assert not np.array_equal(result[20:100, 20:50], original[20:100, 20:50])  # repainted
    page.screenshot(path=str(shots / "playground-inpainting.png"), full_page=True)


def test_image2text_answers_about_a_picked_video(page: Any, vl_site: str, tmp_path: Path) -> None:
    from tests.videos import video_bytes

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(video_bytes("mp4", frames=8, size=(64, 48)))
    open_ready(page, vl_site)
    page.get_by_label("Question").fill("What happens?")
    page.get_by_label("Max new tokens").fill("4")
    page.get_by_role("button", name="Ask").click()
    page.wait_for_selector("#answer[data-done=true]", timeout=120_000)
    without = int(page.locator("#answer").get_attribute("data-prompt-tokens"))
    page.get_by_label("Video (MP4, WebM or animated GIF)").set_input_files(str(clip))
    page.get_by_role("button", name="Ask").click()
    page.wait_for_function(
        "n => document.querySelector('#answer').dataset.promptTokens > n", arg=without,
        timeout=120_000,
    )  # fmt: skip
    assert page.locator("#answer").get_attribute("data-done") == "true"

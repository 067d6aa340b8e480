"""image2text end to end through the tiny Qwen2.5-VL model: every accepted form, every refusal."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hunyuan_service.api.app import create_app
from tests.images import bomb_png, data_uri, encoded, png_bytes
from tests.metrics import value
from tests.recording import RecordingServer


def assert_text_answer(
    response: Any, *, saw_images_of: TestClient | None = None, prompt: str = "Describe this image"
) -> dict:
    """Checks the shape of an answer; with `saw_images_of`, also that its images reached the model.

    An image adds visual tokens to the prompt, so the answer's prompt_tokens must exceed what the
    same prompt costs as text only on that client.
    """
    assert response.status_code == 200, response.text
    body = response.json()
    if saw_images_of is not None:
        assert body["usage"]["prompt_tokens"] > text_only_tokens(saw_images_of, prompt)
    assert isinstance(body["text"], str)
    assert body["usage"]["prompt_tokens"] > 0
    assert 1 <= body["usage"]["completion_tokens"] <= 8
    assert body["finish_reason"] in ("stop", "length")
    assert set(body["timings"]) == {"queue_ms", "inference_ms", "total_ms"}
    return body


MULTIPART_PROMPT = "what is this"


def text_only_tokens(client: TestClient, prompt: str) -> int:
    response = client.post("/infer", json={"prompt": prompt, "max_new_tokens": 1})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


def ask(client: TestClient, images: list[str], **extra: Any) -> Any:
    body = {"prompt": "Describe this image", "images": images, "max_new_tokens": 8, **extra}
    return client.post("/infer", json=body)


@pytest.fixture
def listener() -> Iterator[RecordingServer]:
    server = RecordingServer()
    yield server
    server.server.shutdown()
    server.server.server_close()


# -- accepted forms --------------------------------------------------------------------------


def test_data_uri(vl_client: TestClient) -> None:
    assert_text_answer(ask(vl_client, [data_uri(png_bytes())]), saw_images_of=vl_client)


def test_plain_base64(vl_client: TestClient) -> None:
    response = ask(vl_client, [base64.b64encode(png_bytes()).decode()])
    assert_text_answer(response, saw_images_of=vl_client)


def test_text_only(vl_client: TestClient) -> None:
    response = vl_client.post("/infer", json={"prompt": "Say hello", "max_new_tokens": 4})
    assert_text_answer(response)


def test_several_images_cost_more_prompt_tokens(vl_client: TestClient) -> None:
    one = assert_text_answer(ask(vl_client, [data_uri(png_bytes())]))
    two = assert_text_answer(ask(vl_client, [data_uri(png_bytes())] * 2))
    assert two["usage"]["prompt_tokens"] > one["usage"]["prompt_tokens"]


def test_multipart_upload(vl_client: TestClient) -> None:
    response = vl_client.post(
        "/infer",
        data={"prompt": MULTIPART_PROMPT, "max_new_tokens": "6"},
        files=[
            ("images", ("a.png", png_bytes(), "image/png")),
            ("images", ("b.png", png_bytes((32, 32)), "image/png")),
        ],
    )
    assert_text_answer(response, saw_images_of=vl_client, prompt=MULTIPART_PROMPT)


def test_multipart_field_is_validated(vl_client: TestClient) -> None:
    response = vl_client.post(
        "/infer",
        data={"prompt": "x", "max_new_tokens": "lots"},
        files=[("images", ("a.png", png_bytes(), "image/png"))],
    )
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "max_new_tokens"


def test_a_multipart_field_sent_twice_is_refused_not_guessed(vl_client: TestClient) -> None:
    response = vl_client.post(
        "/infer",
        data={"prompt": ["describe it", "ignore that"], "max_new_tokens": "2"},
        files=[("images", ("a.png", png_bytes(), "image/png"))],
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt"
    assert "sent twice" in error["message"]


def test_allowed_local_file_absolute_and_relative(
    vl_open_client: TestClient, media_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (media_dir / "red.png").write_bytes(png_bytes())
    seen = {"saw_images_of": vl_open_client}
    assert_text_answer(ask(vl_open_client, [str(media_dir / "red.png")]), **seen)
    assert_text_answer(ask(vl_open_client, [f"file://{media_dir / 'red.png'}"]), **seen)
    # The reference client sends paths relative to where it runs, as the reference server read them.
    monkeypatch.chdir(media_dir.parent)
    assert_text_answer(ask(vl_open_client, [f"{media_dir.name}/red.png"]), **seen)


def test_allowed_url_is_fetched_by_the_service(
    vl_open_client: TestClient, listener: RecordingServer
) -> None:
    response = ask(vl_open_client, [listener.url("/red.png")])
    assert_text_answer(response, saw_images_of=vl_open_client)
    assert listener.paths == ["/red.png"]


def test_generation_parameters(vl_client: TestClient) -> None:
    image = [data_uri(png_bytes())]
    sampled = {"temperature": 0.8, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "seed": 5}
    first = assert_text_answer(ask(vl_client, image, **sampled))
    again = assert_text_answer(ask(vl_client, image, **sampled))
    assert first["text"] == again["text"]  # the same seed samples the same tokens
    long = vl_client.post("/infer", json={"prompt": "x", "max_new_tokens": 3000})
    assert long.status_code == 422
    assert long.json()["error"]["param"] == "max_new_tokens"


# -- refusals, each followed by a normal request -----------------------------------------------


def refusals(media_dir: Path, listener: RecordingServer) -> dict[str, tuple[list[str], int]]:
    outside = media_dir.parent / "secret.png"
    outside.write_bytes(png_bytes())
    link = media_dir / "link.png"
    if not link.exists():
        os.symlink(outside, link)
    return {
        "etc-passwd": (["/etc/passwd"], 403),
        "outside-folder": ([str(outside)], 403),
        "dot-dot": ([f"{media_dir}/../secret.png"], 403),
        "symlink-out": ([str(link)], 403),
        "redirect-to-disallowed-host": (
            [listener.url("/redirect-to/" + listener.url("/red.png", host="localhost"))],
            403,
        ),
        "disallowed-host": ([listener.url("/red.png", host="localhost")], 403),
        "oversized-remote": ([listener.url("/huge.png")], 413),
        "slow-remote": ([listener.url("/slow.png")], 422),
        "oversized-image": ([data_uri(b"\0" * 300_000)], 413),
        "bomb": ([data_uri(bomb_png())], 413),
        "corrupt": ([data_uri(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)], 422),
        "truncated": ([data_uri(png_bytes((256, 256))[:200])], 422),
        "not-an-image": ([data_uri(b"%PDF-1.4 this is not an image at all")], 422),
        "bad-base64": (["data:image/png;base64,@@@@"], 422),
        "too-many": ([data_uri(png_bytes())] * 9, 422),
        "missing-file": ([str(media_dir / "nope.png")], 422),
    }


@pytest.mark.parametrize(
    "case",
    [
        "etc-passwd",
        "outside-folder",
        "dot-dot",
        "symlink-out",
        "redirect-to-disallowed-host",
        "disallowed-host",
        "oversized-remote",
        "slow-remote",
        "oversized-image",
        "bomb",
        "corrupt",
        "truncated",
        "not-an-image",
        "bad-base64",
        "too-many",
        "missing-file",
    ],
)
def test_refusal_is_a_clear_4xx_and_the_next_request_works(
    vl_open_client: TestClient, media_dir: Path, listener: RecordingServer, case: str
) -> None:
    images, status = refusals(media_dir, listener)[case]
    response = ask(vl_open_client, images)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    assert error["param"].startswith("images")
    if case.startswith(("redirect", "disallowed")):
        assert "/red.png" not in listener.paths  # the disallowed target was never contacted
    assert_text_answer(ask(vl_open_client, [data_uri(png_bytes())]), saw_images_of=vl_open_client)


def test_loopback_url_is_refused_by_default_without_contact(
    vl_client: TestClient, listener: RecordingServer
) -> None:
    response = ask(vl_client, [listener.url("/red.png")])
    assert response.status_code == 403
    assert "ALLOWED_MEDIA_DOMAINS" in response.json()["error"]["message"]
    assert listener.paths == []


def test_allowlisted_host_on_a_private_address_is_refused_without_contact(
    tiny_cache: Path, listener: RecordingServer
) -> None:
    from hunyuan_service.api.app import create_app
    from tests.e2e.conftest import tiny_settings

    settings = tiny_settings("image2text", tiny_cache, allowed_media_domains=["127.0.0.1"])
    with TestClient(create_app(settings)) as client:
        response = ask(client, [listener.url("/red.png")])
    assert response.status_code == 403
    assert "private" in response.json()["error"]["message"]
    assert listener.paths == []


def test_local_paths_are_refused_by_default(vl_client: TestClient) -> None:
    for path in ("/etc/passwd", "file:///etc/passwd", "../../etc/passwd"):
        response = ask(vl_client, [path])
        assert response.status_code == 403
        assert "ALLOWED_LOCAL_MEDIA_DIR" in response.json()["error"]["message"]


def test_oversized_body_is_413_for_json_and_multipart(vl_open_client: TestClient) -> None:
    big = "x" * 1_100_000
    assert vl_open_client.post("/infer", json={"prompt": big}).status_code == 413
    response = vl_open_client.post(
        "/infer", data={"prompt": "x"}, files=[("images", ("a.png", big.encode(), "image/png"))]
    )
    assert response.status_code == 413


@pytest.mark.parametrize("path", ["/infer", "/v1/chat/completions"])
def test_a_compressed_body_is_a_415_that_says_to_send_it_uncompressed(
    vl_client: TestClient, path: str
) -> None:
    import gzip
    import json

    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    if path == "/infer":
        body = {"prompt": "hi", "max_new_tokens": 2}
    packed = gzip.compress(json.dumps(body).encode())
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    response = vl_client.post(path, content=packed, headers=headers)
    assert response.status_code == 415, response.text
    assert "send the body uncompressed" in response.json()["error"]["message"]
    form = {"prompt": "hi", "max_new_tokens": "2"}
    if path == "/infer":  # a form is refused the same way
        files = [("images", ("a.png", png_bytes(), "image/png"))]
        refused = vl_client.post(path, data=form, files=files, headers={"content-encoding": "br"})
        assert refused.status_code == 415, refused.text
    # The same body, uncompressed or marked identity, is answered.
    plain = {"content-type": "application/json", "content-encoding": "identity"}
    assert vl_client.post(path, content=json.dumps(body), headers=plain).status_code == 200


def test_five_concurrent_reference_clients_with_allowed_files(
    vl_open_client: TestClient, media_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference client: {"images": ["<folder>/http_output_N.png"], "prompt"}, five at once."""
    from concurrent.futures import ThreadPoolExecutor

    for i in range(1, 6):
        (media_dir / f"http_output_{i}.png").write_bytes(png_bytes((32 * i, 32)))
    monkeypatch.chdir(media_dir.parent)

    def client(i: int) -> Any:
        path = f"{media_dir.name}/http_output_{i}.png"
        body = {"images": [path], "prompt": "Describe this image"}
        return vl_open_client.post("/infer", json=body)

    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(client, range(1, 6)))
    assert [r.status_code for r in responses] == [200] * 5
    baseline = text_only_tokens(vl_open_client, "Describe this image")
    for response in responses:
        assert isinstance(response.json()["text"], str)
        assert response.json()["usage"]["prompt_tokens"] > baseline  # the file reached the model


@pytest.mark.parametrize("batch", [1, 4])  # alone, and joining the continuous decoder
def test_input_over_max_input_tokens_is_a_422_and_others_still_run(
    tiny_cache: Path, batch: int
) -> None:
    from hunyuan_service.errors import InvalidInput
    from hunyuan_service.models.base import JobContext
    from hunyuan_service.models.qwen_vl import QwenVLModel
    from hunyuan_service.models.types import ChatMessage, Image2TextInput
    from tests.e2e.conftest import tiny_settings

    settings = tiny_settings("image2text", tiny_cache, max_input_tokens=256, max_batch_size=batch)
    with TestClient(create_app(settings)) as client:
        big = Image.new("RGB", (600, 600), (10, 120, 200))
        body = {"prompt": "Describe", "images": [data_uri(encoded(big, "PNG"))]}
        response = client.post("/infer", json=body)
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["param"] == "messages"
        assert "at most 256 are allowed (MAX_INPUT_TOKENS)" in error["message"]
        assert client.post("/infer", json={"prompt": "Describe"}).status_code == 200
        metrics = client.get("/metrics").text
        assert value(metrics, "hunyuan_jobs_total", outcome="refused_by_model") == 1
        assert 'outcome="failed"' not in metrics  # not counted as an inference failure

    model = QwenVLModel(settings)
    model.load()
    over = Image2TextInput((ChatMessage("user", "Describe", (big,)),), max_new_tokens=3)
    fine = Image2TextInput((ChatMessage("user", "Describe"),), max_new_tokens=3)
    before = model.images.encoded
    results = model.infer_batch([over, fine], [JobContext(), JobContext()])
    assert model.images.encoded == before  # the refused row's image never went through it
    assert isinstance(results[0], InvalidInput)
    assert results[1].completion_tokens >= 1


# -- per-request resolution ------------------------------------------------------------------


def big_image() -> str:
    return data_uri(encoded(Image.new("RGB", (640, 480), (40, 90, 160)), "PNG"))


def test_a_smaller_max_pixels_gives_fewer_prompt_tokens(vl_client: TestClient) -> None:
    default = assert_text_answer(ask(vl_client, [big_image()]))["usage"]["prompt_tokens"]
    small = ask(vl_client, [big_image()], max_pixels=56 * 56)
    smaller = assert_text_answer(small)["usage"]["prompt_tokens"]
    assert smaller < default
    # The server's own bound stays the default: asking for it changes nothing.
    settings = vl_client.app.state.engine.settings  # type: ignore[attr-defined]
    same = ask(vl_client, [big_image()], max_pixels=settings.vl_max_pixels)
    assert assert_text_answer(same)["usage"]["prompt_tokens"] == default


def test_a_larger_min_pixels_enlarges_a_small_image(vl_client: TestClient) -> None:
    default = assert_text_answer(ask(vl_client, [data_uri(png_bytes())]))["usage"]
    larger = assert_text_answer(ask(vl_client, [data_uri(png_bytes())], min_pixels=224 * 224))
    assert larger["usage"]["prompt_tokens"] > default["prompt_tokens"]


def test_each_image_may_carry_its_own_pixel_bounds(vl_client: TestClient) -> None:
    """`{"image", "min_pixels", "max_pixels"}` sizes that image alone, over the request's."""
    small = 56 * 56

    def tokens(images: list[Any], **extra: Any) -> int:
        return int(assert_text_answer(ask(vl_client, images, **extra))["usage"]["prompt_tokens"])

    both_default = tokens([big_image(), big_image()])
    both_small = tokens([big_image(), big_image()], max_pixels=small)
    first_small = tokens([{"image": big_image(), "max_pixels": small}, big_image()])
    assert both_small < first_small < both_default
    # Each image's tokens add up: one small and one default sit halfway.
    assert 2 * first_small == both_small + both_default
    # An item's own bound wins over the request's, either way.
    settings = vl_client.app.state.engine.settings  # type: ignore[attr-defined]
    lifted = [{"image": big_image(), "max_pixels": settings.vl_max_pixels}, big_image()]
    assert tokens(lifted, max_pixels=small) == first_small
    enlarged = tokens([{"image": data_uri(png_bytes()), "min_pixels": 224 * 224}])
    assert enlarged > tokens([data_uri(png_bytes())])
    assert enlarged == tokens([data_uri(png_bytes())], min_pixels=224 * 224)


@pytest.mark.parametrize(
    ("images", "field"),
    [
        ([{"image": "x", "max_pixels": 100}], "images[0].max_pixels"),
        (["x", {"image": "x", "min_pixels": 10**9}], "images[1].min_pixels"),
        ([{"image": "x", "min_pixels": 100_000, "max_pixels": 50_000}], "images[0].min_pixels"),
        ([{"image": "x", "size": 3}], "images[0].size"),  # an unknown key
        ([{"max_pixels": 5000}], "images[0].image"),  # no image in the item
        ([{"image": "x", "max_pixels": "big"}], "images[0].max_pixels"),
        (["x", 5], "images[1]"),  # neither a string nor an object
    ],
)
def test_bad_image_items_are_422s_naming_the_item(
    vl_client: TestClient, images: list[Any], field: str
) -> None:
    response = ask(vl_client, images)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field
    # One problem per bad item: not one for each form (string, object) it is not.
    assert error["message"].count(";") == 0, error["message"]


def assert_refused(response: Any, param: str, *phrases: str) -> None:
    """A 422 whose error names `param` and says each of `phrases`."""
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param
    for phrase in phrases:
        assert phrase in error["message"]


@pytest.mark.parametrize("size", [(2000, 2), (3, 700)])
def test_an_image_beyond_qwens_aspect_ratio_is_a_422_naming_it(
    vl_client: TestClient, size: tuple[int, int]
) -> None:
    from qwen_vl_utils import vision_process

    from hunyuan_service.api.image2text import MAX_ASPECT_RATIO

    # Qwen's resize refuses what intake refuses, and nothing less.
    assert vision_process.MAX_RATIO == MAX_ASPECT_RATIO == 200
    response = ask(vl_client, [data_uri(png_bytes()), data_uri(png_bytes(size))])
    assert_refused(response, "images[1]", f"{size[0]}x{size[1]} pixels", "crop or pad it")
    # At the ratio itself the image is answered.
    at_limit = (400, 2) if size[0] > size[1] else (3, 600)
    assert ask(vl_client, [data_uri(png_bytes(at_limit))]).status_code == 200


@pytest.mark.parametrize(("size", "resized"), [((6000, 30), "5992x28"), ((30, 6000), "28x5992")])
def test_an_image_at_the_ratio_but_past_it_once_rounded_to_28_is_a_422_not_a_500(
    vl_client: TestClient, size: tuple[int, int], resized: str
) -> None:
    # 6000x30 is 200:1, which intake allows; Qwen's resize rounds it to 5992x28 (214:1), which
    # the model's image processor refuses: the request is refused before it is queued.
    response = ask(vl_client, [data_uri(png_bytes()), data_uri(png_bytes(size))])
    assert_refused(
        response, "images[1]", f"{size[0]}x{size[1]} pixels, {resized} once", "crop or pad it"
    )
    assert ask(vl_client, [data_uri(png_bytes())]).status_code == 200  # the worker is fine


def test_a_thin_image_whose_short_side_a_small_max_pixels_rounds_to_0_is_a_422(
    vl_client: TestClient,
) -> None:
    # Within 3,136 pixels (4 patches), 30x6000 would be 0x784: qwen_vl_utils cannot resize to
    # that, and the request used to end in a 500.
    response = vl_client.post(
        "/infer",
        json={"prompt": "x", "images": [data_uri(png_bytes((30, 6000)))], "max_pixels": 3136},
    )
    assert_refused(response, "images[0]", "30x6000 pixels, 0x784 once resized", "raise max_pixels")


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"max_pixels": 100}, "max_pixels"),  # under Qwen's 4 patches
        ({"max_pixels": 10**9}, "max_pixels"),  # over VL_MAX_PIXELS
        ({"min_pixels": 10**9}, "min_pixels"),
        ({"min_pixels": 100_000, "max_pixels": 50_000}, "min_pixels"),
    ],
)
def test_pixel_bounds_outside_the_servers_are_refused_naming_the_field(
    vl_client: TestClient, extra: dict, field: str
) -> None:
    response = ask(vl_client, [data_uri(png_bytes())], **extra)
    assert response.status_code == 422, response.text
    assert field in response.text

"""Video input for image2text on the tiny Qwen2.5-VL: every form, every cap, bombs and broken
files, through /infer, multipart, /v1/jobs and /v1/chat/completions."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hunyuan_service.api.app import create_app
from tests.e2e.conftest import tiny_settings
from tests.e2e.test_jobs import wait_done
from tests.images import png_bytes
from tests.videos import video_bytes

MP4 = video_bytes("mp4", frames=12, size=(64, 48), rate=4)  # 3 s
QUESTION = {"prompt": "What happens in this clip?", "max_new_tokens": 4}


def uri(data: bytes, media_type: str = "video/mp4") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def client(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    media = tmp_path_factory.mktemp("video-media")
    (media / "clip.mp4").write_bytes(MP4)
    settings = tiny_settings("image2text", tiny_cache, allowed_local_media_dir=media)
    with TestClient(create_app(settings)) as test_client:
        test_client.media = media
        yield test_client


@pytest.fixture(scope="module")
def capped(tiny_cache: Path) -> Iterator[TestClient]:
    settings = tiny_settings(
        "image2text",
        tiny_cache,
        max_video_bytes=200_000,
        max_video_seconds=5,
        max_video_decoded_frames=40,
        max_video_frame_pixels=20_000,
        max_video_tokens=64,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def ask(client: TestClient, **fields: Any) -> Any:
    return client.post("/infer", json={**QUESTION, **fields})


def prompt_tokens(response: Any) -> int:
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens"])


def test_every_form_is_accepted(client: TestClient) -> None:
    text_only = prompt_tokens(ask(client))
    forms = {
        "mp4 data URI": uri(MP4),
        "webm base64": base64.b64encode(video_bytes("webm", frames=12, rate=4)).decode(),
        "animated GIF": uri(video_bytes("gif", frames=12, rate=4), "image/gif"),
        "local path": str(client.media / "clip.mp4"),  # type: ignore[attr-defined]
    }
    for name, value in forms.items():
        assert prompt_tokens(ask(client, videos=[value])) > text_only, name
    upload = client.post(
        "/infer",
        data={"prompt": "What happens?"},
        files=[("videos", ("clip.mp4", MP4, "video/mp4"))],
    )
    assert prompt_tokens(upload) > text_only
    plain_chat = chat(client, [])
    with_video = chat(client, [{"type": "video_url", "video_url": {"url": uri(MP4)}}])
    assert with_video > plain_chat


def chat(client: TestClient, parts: list[dict[str, Any]]) -> int:
    """The prompt tokens of a chat turn with these parts before its question."""
    message = {"role": "user", "content": [*parts, {"type": "text", "text": "What happens?"}]}
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "max_tokens": 4,
            "messages": [message],
            "mm_processor_kwargs": {"fps": 1},
        },
    )
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens"])


def test_more_frames_give_more_prompt_tokens(client: TestClient) -> None:
    one = prompt_tokens(ask(client, videos=[uri(MP4)], fps=1))  # 3 frames, padded to 4
    four = prompt_tokens(ask(client, videos=[uri(MP4)], fps=4))  # all 12
    capped = prompt_tokens(ask(client, videos=[uri(MP4)], fps=4, max_frames=6))
    assert one < capped < four
    larger = uri(video_bytes("mp4", frames=4, size=(128, 96)))
    smaller = prompt_tokens(ask(client, videos=[larger], max_pixels=28 * 28 * 4))
    assert smaller < prompt_tokens(ask(client, videos=[larger]))  # frames within max_pixels


def test_min_pixels_enlarges_small_frames_per_video_or_per_request(client: TestClient) -> None:
    """A 64x48 clip's frames are 4 tokens each; a min_pixels enlarges them (within the
    frames' share of MAX_VIDEO_TOKENS), set on the request or on the video alone."""
    plain = prompt_tokens(ask(client, videos=[uri(MP4)]))
    request_wide = prompt_tokens(ask(client, videos=[uri(MP4)], min_pixels=112 * 112))
    assert request_wide > plain
    own = prompt_tokens(ask(client, videos=[{"video": uri(MP4), "min_pixels": 112 * 112}]))
    assert own == request_wide
    # The item's bound is its own: the other video keeps the request's.
    pair = prompt_tokens(
        ask(client, videos=[{"video": uri(MP4), "min_pixels": 112 * 112}, uri(MP4)])
    )
    both = prompt_tokens(ask(client, videos=[uri(MP4), uri(MP4)]))
    assert pair - both == request_wide - plain
    chat_own = chat(
        client,
        [{"type": "video_url", "video_url": {"url": uri(MP4)}, "min_pixels": 112 * 112}],
    )
    assert chat_own > chat(client, [{"type": "video_url", "video_url": {"url": uri(MP4)}}])
    refused = ask(client, videos=[{"video": uri(MP4), "max_pixels": 10}])
    assert refused.status_code == 422
    assert "videos[0].max_pixels" in refused.text


def test_a_repeated_video_skips_the_encoder(client: TestClient, tiny_cache: Path) -> None:
    model = client.app.state.engine.model  # type: ignore[attr-defined]
    first = ask(client, videos=[uri(MP4)], fps=3)
    before = model.images.encoded
    again = ask(client, videos=[uri(MP4)], fps=3)
    assert model.images.encoded == before
    assert again.json()["text"] == first.json()["text"]
    ask(client, videos=[uri(MP4)], fps=1.5)  # sampled otherwise: a miss
    assert model.images.encoded == before + 1


@pytest.mark.parametrize(
    ("videos", "status", "words"),
    [
        ([b"\0" * 250_000], 413, "bytes"),
        ([video_bytes("mp4", frames=28, size=(64, 48), rate=4)], 413, "MAX_VIDEO_SECONDS"),
        ([video_bytes("mp4", frames=60, size=(64, 48), rate=30)], 413, "MAX_VIDEO_DECODED_FRAMES"),
        ([video_bytes("mp4", frames=4, size=(320, 240))], 413, "MAX_VIDEO_FRAME_PIXELS"),
        # Each fits alone (its frames shrink to its share); together they are over the cap.
        ([video_bytes("mp4", frames=16, size=(128, 96), rate=4)] * 2, 422, "MAX_VIDEO_TOKENS"),
    ],
    ids=["bytes", "seconds", "decoded-frames", "frame-pixels", "tokens"],
)
def test_every_cap_is_a_4xx_naming_it(
    capped: TestClient, videos: list[bytes], status: int, words: str
) -> None:
    response = ask(capped, videos=[uri(video) for video in videos], fps=4, max_frames=16)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] in ("videos", "videos[0]")
    assert words in error["message"]


def test_bombs_are_refused_from_the_header(capped: TestClient) -> None:
    # Small files that claim much: 2,000 frames of 64x48, and 1920x1080 frames.
    many = video_bytes("mp4", frames=1000, size=(64, 48), rate=400)
    huge = video_bytes("mp4", frames=2, size=(1920, 1080), rate=2)
    assert len(many) < 200_000
    assert len(huge) < 200_000
    for video, words in ((many, "frames"), (huge, "1920x1080")):
        response = ask(capped, videos=[uri(video)])
        assert response.status_code == 413, response.text
        assert words in response.json()["error"]["message"]


def test_broken_and_mislabelled_files_are_422s(client: TestClient) -> None:
    cases = [
        ({"videos": [uri(MP4[: len(MP4) // 2])]}, "videos[0]", "not a readable video"),
        ({"videos": [uri(b"\x00\x01 not a video at all" * 50)]}, "videos[0]", "not a readable"),
        ({"videos": [uri(png_bytes(), "image/png")]}, "videos[0]", "unsupported video format"),
        ({"images": [uri(MP4, "image/png")]}, "images[0]", "not a readable image"),
    ]
    for fields, param, words in cases:
        response = ask(client, **fields)
        assert response.status_code == 422, (param, response.text)
        error = response.json()["error"]
        assert (error["param"], words in error["message"]) == (param, True), error


def test_jobs_and_the_continuous_decoder_answer_as_infer_does(
    client: TestClient, tiny_cache: Path
) -> None:
    expected = ask(client, videos=[uri(MP4)], fps=2).json()
    submitted = client.post("/v1/jobs", json={**QUESTION, "videos": [uri(MP4)], "fps": 2})
    assert submitted.status_code == 202, submitted.text
    done = wait_done(client, submitted.json()["id"])
    assert done["result"]["text"] == expected["text"]
    settings = tiny_settings("image2text", tiny_cache, max_batch_size=4)
    with TestClient(create_app(settings)) as continuous:
        answer = ask(continuous, videos=[uri(MP4)], fps=2).json()
    assert (answer["text"], answer["usage"]) == (expected["text"], expected["usage"])

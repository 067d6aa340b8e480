"""The output path never holds up the model: while job k's image is encoded (CPU pool), job k+1
is already denoising. Shown by the order of events on the tiny FLUX model, not by timing."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from hunyuan_service.api import text2image
from hunyuan_service.api.app import create_app
from tests.conftest import LiveServer
from tests.e2e.conftest import tiny_settings

WAIT_S = 120  # only a hang reaches it


def test_the_next_job_denoises_while_the_last_one_is_encoded(
    tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    first_encoding, second_stepped = threading.Event(), threading.Event()
    encode = text2image.image_json

    def held_encode(image: Any, fmt: str, fields: dict[str, Any]) -> tuple[bytes, bytes | None]:
        # Job k's encoding may only finish once job k+1 has taken a step: if encoding held the
        # model, that step could never come and this would wait out WAIT_S.
        if fields["seed"] == 1:
            first_encoding.set()
            order.append("first: encoding" if second_stepped.wait(WAIT_S) else "first: timed out")
        return encode(image, fmt, fields)

    monkeypatch.setattr(text2image, "image_json", held_encode)
    app = create_app(tiny_settings("text2image", tiny_cache, max_batch_size=1))
    first_body = {"prompt": "one", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 1}
    with LiveServer(app) as server:
        replies: dict[str, httpx.Response] = {}

        def post_first() -> None:
            replies["first"] = httpx.post(f"{server.url}/infer", json=first_body, timeout=300)
            order.append("first: answered")

        first = threading.Thread(target=post_first)
        first.start()

        # The first job is ahead of the second once it sits in its held encoding (an event,
        # not a poll of /health, which can miss its short queued and denoising moments).
        assert first_encoding.wait(WAIT_S), "the first job never reached its encoding"
        second = httpx.post(
            f"{server.url}/v1/jobs",
            json={**first_body, "prompt": "two", "seed": 2, "num_inference_steps": 3},
        ).json()["id"]
        with httpx.stream("GET", f"{server.url}/v1/jobs/{second}/events", timeout=300) as events:
            for line in events.iter_lines():
                if line == "event: progress":
                    order.append("second: first step")
                    second_stepped.set()
                    break
        first.join(timeout=300)
    assert order == ["second: first step", "first: encoding", "first: answered"]
    assert replies["first"].status_code == 200
    assert replies["first"].json()["seed"] == 1

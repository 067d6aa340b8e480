"""`n` images per text2image request, on the tiny FLUX: each with its own seed, reproducible alone,
denoised together up to MAX_BATCH_SIZE rows per pipeline call."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hunyuan_service.api.app import create_app
from tests.e2e.conftest import tiny_settings
from tests.e2e.test_jobs import wait_done
from tests.sse import parse_sse

BODY = {"prompt": "a harbour at night", "width": 64, "height": 80, "seed": 20,
        "num_inference_steps": 3}  # fmt: skip


def decoded(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))), dtype=np.int16)


def alone(client: TestClient, seed: int) -> np.ndarray:
    response = client.post("/infer", json={**BODY, "seed": seed})
    assert response.status_code == 200, response.text
    return decoded(response.json()["image_base64"])


@pytest.fixture(scope="module")
def batched_client(tiny_cache: Path) -> Iterator[TestClient]:
    settings = tiny_settings("text2image", tiny_cache, max_batch_size=4)
    with TestClient(create_app(settings)) as client:
        yield client


def test_n_images_each_with_its_seed_and_equal_to_it_alone(flux_client: TestClient) -> None:
    response = flux_client.post("/infer", json={**BODY, "n": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["seed"] for item in body["images"]] == [20, 21, 22]
    images = [decoded(item["image_base64"]) for item in body["images"]]
    assert body["image_base64"] == body["images"][0]["image_base64"]  # the first, as with n=1
    assert len({image.tobytes() for image in images}) == 3
    for seed, image in zip((20, 21, 22), images, strict=True):
        assert np.array_equal(image, alone(flux_client, seed))  # one row per call: exact
    assert "images" not in alone_body(flux_client)


def alone_body(client: TestClient) -> dict[str, Any]:
    return dict(client.post("/infer", json=BODY).json())


def test_with_room_for_rows_the_n_images_denoise_in_one_call(batched_client: TestClient) -> None:
    response = batched_client.post("/infer", json={**BODY, "n": 3, "stream": True})
    events = [event for event in parse_sse(response.text) if event[0] != "comment"]
    progress = [(data["step"], data["total"]) for name, data in events if name == "progress"]
    assert progress == [(1, 3), (2, 3), (3, 3)]  # one pipeline call of three rows
    result = events[-1][1]
    for item in result["images"]:
        solo = alone(batched_client, item["seed"])
        assert np.abs(decoded(item["image_base64"]) - solo).max() <= 1  # floating-point noise


def test_n_inpainted_images_denoise_in_one_call_and_keep_the_unmasked_pixels(
    batched_client: TestClient,
) -> None:
    from tests.images import data_uri, encoded

    rng = np.random.default_rng(5)
    source = Image.fromarray(rng.integers(0, 256, (80, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 80), 0)
    mask.paste(255, (0, 0, 32, 80))  # repaint the left half
    edit = {**BODY, "image": data_uri(encoded(source, "PNG")), "strength": 1.0,
            "mask": data_uri(encoded(mask, "PNG"))}  # fmt: skip
    response = batched_client.post("/infer", json={**edit, "n": 3, "stream": True})
    events = [event for event in parse_sse(response.text) if event[0] != "comment"]
    progress = [(data["step"], data["total"]) for name, data in events if name == "progress"]
    assert progress == [(1, 3), (2, 3), (3, 3)]  # one pipeline call of three rows
    images = [decoded(item["image_base64"]) for item in events[-1][1]["images"]]
    assert len({image.tobytes() for image in images}) == 3  # each from its own seed
    sent = np.asarray(source, dtype=np.int16)
    for seed, image in zip((20, 21, 22), images, strict=True):
        assert np.array_equal(image[:, 32:], sent[:, 32:])  # every unmasked pixel as sent
        one = batched_client.post("/infer", json={**edit, "seed": seed})
        assert one.status_code == 200, one.text
        assert np.abs(image - decoded(one.json()["image_base64"])).max() <= 2


def test_n_is_capped_and_several_images_never_come_back_raw(flux_client: TestClient) -> None:
    over = flux_client.post("/infer", json={**BODY, "n": 5})  # MAX_IMAGES_PER_REQUEST is 4
    assert over.status_code == 422
    assert over.json()["error"]["param"] == "n"
    raw = flux_client.post("/infer", json={**BODY, "n": 2}, headers={"Accept": "image/png"})
    assert raw.status_code == 406
    assert raw.json()["error"]["param"] == "n"
    # Refused before its image is decoded: an unreadable image would otherwise be the 422.
    edit = {**BODY, "n": 2, "image": "bm90IGFuIGltYWdl"}  # base64 of "not an image"
    early = flux_client.post("/infer", json=edit, headers={"Accept": "image/png"})
    assert (early.status_code, early.json()["error"]["param"]) == (406, "n")
    assert flux_client.post("/infer", json=edit).status_code == 422  # the image, once accepted


def test_jobs_and_the_openai_endpoint_carry_each_seed(flux_client: TestClient) -> None:
    submitted = flux_client.post("/v1/jobs", json={**BODY, "n": 2})
    assert submitted.status_code == 202
    done = wait_done(flux_client, submitted.json()["id"])
    assert [item["seed"] for item in done["result"]["images"]] == [20, 21]
    openai = flux_client.post(
        "/v1/images/generations",
        json={"prompt": BODY["prompt"], "size": "64x80", "n": 2, "seed": 20,
              "num_inference_steps": 3},
    )  # fmt: skip
    assert openai.status_code == 200
    data = openai.json()["data"]
    assert [item["seed"] for item in data] == [20, 21]
    assert np.array_equal(decoded(data[1]["b64_json"]), alone(flux_client, 21))

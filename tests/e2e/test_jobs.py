"""The jobs API end to end on the tiny real models: the same results /infer gives."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image

from tests.images import data_uri, png_bytes


def wait_done(client: TestClient, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120  # generous: fails only on a hang
    while True:
        body = client.get(f"/v1/jobs/{job_id}").json()
        if body["status"] not in ("queued", "running"):
            return body
        assert time.monotonic() < deadline, f"job {job_id} still {body['status']}"
        time.sleep(0.02)


def test_text2image_job_gives_the_same_image_as_infer(flux_client: TestClient) -> None:
    body = {"prompt": "a red fox", "width": 64, "height": 96, "seed": 11}
    submitted = flux_client.post("/v1/jobs", json=body)
    assert submitted.status_code == 202
    done = wait_done(flux_client, submitted.json()["id"])
    assert done["status"] == "succeeded"
    # The store keeps the encoded result; the decoded image it came from is let go.
    engine = flux_client.app.state.engine  # type: ignore[attr-defined]
    assert engine.jobs.get(done["id"]).handle.output is None
    direct = flux_client.post("/infer", json=body).json()
    assert done["result"]["image_base64"] == direct["image_base64"]  # same seed, same pixels
    raw = flux_client.get(f"/v1/jobs/{done['id']}", headers={"Accept": "image/png"})
    image = Image.open(io.BytesIO(raw.content))
    assert (image.format, image.size) == ("PNG", (64, 96))
    decoded = Image.open(io.BytesIO(base64.b64decode(direct["image_base64"])))
    assert image.tobytes() == decoded.tobytes()


def test_image2text_job_reads_its_image(vl_client: TestClient) -> None:
    text_only = vl_client.post("/v1/jobs", json={"prompt": "Describe", "max_new_tokens": 4})
    with_image = vl_client.post(
        "/v1/jobs",
        json={"prompt": "Describe", "images": [data_uri(png_bytes())], "max_new_tokens": 4},
    )
    assert (text_only.status_code, with_image.status_code) == (202, 202)
    baseline = wait_done(vl_client, text_only.json()["id"])["result"]["usage"]["prompt_tokens"]
    done = wait_done(vl_client, with_image.json()["id"])
    assert done["status"] == "succeeded"
    assert isinstance(done["result"]["text"], str)
    assert done["result"]["usage"]["prompt_tokens"] > baseline  # the image reached the model


def test_multipart_job_upload(vl_client: TestClient) -> None:
    files = [("images", ("red.png", png_bytes(), "image/png"))]
    data = {"prompt": "Describe", "max_new_tokens": "4"}
    submitted = vl_client.post("/v1/jobs", data=data, files=files)
    assert submitted.status_code == 202
    assert wait_done(vl_client, submitted.json()["id"])["status"] == "succeeded"

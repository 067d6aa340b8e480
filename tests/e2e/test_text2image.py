"""text2image end to end through the tiny FLUX model: JSON and raw bytes, validation, seeds."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.metrics import series, value


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_json_response_carries_a_decodable_image(flux_client: TestClient) -> None:
    response = flux_client.post("/infer", json={"prompt": "a red fox", "width": 64, "height": 64})
    assert response.status_code == 200
    body = response.json()
    image = decode(body["image_base64"])
    assert image.format == "PNG"
    assert image.size == (64, 64)
    assert (body["format"], body["width"], body["height"]) == ("png", 64, 64)
    assert isinstance(body["seed"], int)
    assert set(body["timings"]) == {"queue_ms", "inference_ms", "total_ms"}
    assert response.headers["x-request-id"]


def test_reference_prompt_only_body_uses_the_default_size(flux_client: TestClient) -> None:
    response = flux_client.post("/infer", json={"prompt": "a cat on a windowsill"})
    assert response.status_code == 200
    assert decode(response.json()["image_base64"]).size == (1024, 1024)


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_format(flux_client: TestClient, fmt: str, pil_format: str) -> None:
    body = {"prompt": "x", "width": 96, "height": 64, "output_format": fmt}
    response = flux_client.post("/infer", json=body)
    assert response.status_code == 200
    image = decode(response.json()["image_base64"])
    assert (image.format, image.size) == (pil_format, (96, 64))


@pytest.mark.parametrize(("accept", "pil_format"), [("image/png", "PNG"), ("image/jpeg", "JPEG")])
def test_raw_bytes_with_accept_header(
    flux_client: TestClient, accept: str, pil_format: str
) -> None:
    response = flux_client.post(
        "/infer",
        json={"prompt": "x", "width": 128, "height": 64, "seed": 7},
        headers={"Accept": accept},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == accept
    assert response.headers["x-seed"] == "7"
    image = Image.open(io.BytesIO(response.content))
    assert (image.format, image.size) == (pil_format, (128, 64))


def test_same_seed_same_image_and_other_seed_differs(flux_client: TestClient) -> None:
    def image_for(seed: int) -> bytes:
        body = {"prompt": "a red fox", "width": 64, "height": 64, "seed": seed}
        response = flux_client.post("/infer", json=body, headers={"Accept": "image/png"})
        assert response.status_code == 200
        return Image.open(io.BytesIO(response.content)).tobytes()

    assert image_for(42) == image_for(42)
    assert image_for(42) != image_for(43)


def test_random_seed_is_returned_and_reproduces(flux_client: TestClient) -> None:
    first = flux_client.post("/infer", json={"prompt": "y", "width": 64, "height": 64}).json()
    again = flux_client.post(
        "/infer", json={"prompt": "y", "width": 64, "height": 64, "seed": first["seed"]}
    ).json()
    assert decode(first["image_base64"]).tobytes() == decode(again["image_base64"]).tobytes()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 5000}, "prompt"),
        ({"prompt": "x", "width": 65}, "width"),
        ({"prompt": "x", "height": 4096}, "height"),
        ({"prompt": "x", "width": 16}, "width"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": 1000}, "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "x", "seed": -5}, "seed"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "steps": 4}, "steps"),
        ({"prompt": 12}, "prompt"),
    ],
)
def test_invalid_input_gets_422_naming_the_field(
    flux_client: TestClient, body: dict, field: str
) -> None:
    response = flux_client.post("/infer", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == field
    assert field in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]


def test_malformed_json_is_a_4xx_not_a_500(flux_client: TestClient) -> None:
    response = flux_client.post(
        "/infer", content=b'{"prompt": "x",', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "JSON" in response.json()["error"]["message"]


def test_form_content_type_with_json_body_is_read_as_json(flux_client: TestClient) -> None:
    # curl -d sends application/x-www-form-urlencoded unless told otherwise.
    response = flux_client.post(
        "/infer",
        content=b'{"prompt":"a red fox","width":64,"height":64}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200
    assert decode(response.json()["image_base64"]).size == (64, 64)


def test_oversized_body_is_413(flux_client: TestClient) -> None:
    huge = b'{"prompt": "' + b"x" * (65 * 2**20) + b'"}'
    response = flux_client.post("/infer", content=huge)
    assert response.status_code == 413


def test_concurrent_clients_all_get_images(flux_client: TestClient) -> None:
    def one(i: int) -> tuple[int, tuple[int, int]]:
        body = {"prompt": f"prompt {i}", "width": 64 + 16 * i, "height": 64}
        response = flux_client.post("/infer", json=body)
        return response.status_code, decode(response.json()["image_base64"]).size

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(one, range(5)))
    assert results == [(200, (64 + 16 * i, 64)) for i in range(5)]


def test_health_and_ready_describe_the_demo_model(flux_client: TestClient) -> None:
    for path in ("/health", "/ready"):
        response = flux_client.get(path)
        assert response.status_code == 200
        body = response.json()
        assert body["model_type"] == "text2image"
        assert body["model_id"] == "tiny"
        assert body["demo"] is True
        assert "noise" in body["notice"]
        assert (body["device"], body["dtype"]) == ("cpu", "float32")
        assert body["queue_depth"] == 0
        assert body["busy"] is False


def test_metrics_count_completed_jobs(flux_client: TestClient) -> None:
    def completed() -> int:
        return int(
            value(flux_client.get("/metrics").text, "hunyuan_jobs_total", outcome="completed")
        )

    before = completed()
    flux_client.post("/infer", json={"prompt": "x", "width": 64, "height": 64})
    assert completed() == before + 1
    text = flux_client.get("/metrics").text
    buckets = [found for _, found in series(text, "hunyuan_inference_seconds_bucket")]
    assert len(buckets) == 13
    assert buckets == sorted(buckets)  # cumulative
    assert buckets[-1] == completed()  # the +Inf bucket counts every completed job
    assert f"hunyuan_inference_seconds_count {completed()}" in text


def test_wrong_method_is_405_with_allow_and_probes_answer_head(flux_client: TestClient) -> None:
    response = flux_client.get("/infer")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == "http_error"
    for probe in ("/health", "/ready"):
        head = flux_client.head(probe)
        assert head.status_code == 200
        assert head.content == b""


def test_unknown_route_uses_the_error_shape(flux_client: TestClient) -> None:
    response = flux_client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_openapi_documents_the_infer_bodies_without_dangling_refs(flux_client: TestClient) -> None:
    spec = flux_client.get("/openapi.json").json()
    body = spec["paths"]["/infer"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["title"] == "Text2ImageRequest"
    assert "multipart/form-data" not in body  # text2image takes JSON only
    jobs = spec["paths"]["/v1/jobs"]["post"]
    job_body = jobs["requestBody"]["content"]["application/json"]["schema"]
    assert job_body["title"] == "Text2ImageJobRequest"
    assert "webhook" in job_body["properties"]
    assert "202" in jobs["responses"]
    assert "#/$defs/" not in flux_client.get("/openapi.json").text
    assert flux_client.get("/docs").status_code == 200


def test_weights_are_loaded_onto_the_device_by_from_pretrained(flux: Any, tiny_cache: Path) -> None:
    """`from_pretrained` is told the device, so real checkpoints skip a copy in CPU memory; the
    image is the one of a pipeline loaded the plain way."""
    import torch
    from diffusers import FluxPipeline

    from hunyuan_service.models.base import JobContext
    from hunyuan_service.models.tiny import ensure_tiny_checkpoint
    from hunyuan_service.models.types import Text2ImageInput

    assert flux.pipe.hf_device_map == flux.device
    plain = FluxPipeline.from_pretrained(ensure_tiny_checkpoint("text2image", tiny_cache))
    assert plain.hf_device_map is None
    request = Text2ImageInput("a lighthouse", 64, 64, num_inference_steps=3, seed=5)
    served = np.asarray(flux.infer(request, JobContext()).image)
    generator = torch.Generator("cpu").manual_seed(5)
    direct = plain(
        "a lighthouse", height=64, width=64, num_inference_steps=3, generator=generator,
        guidance_scale=flux.defaults.guidance_scale,
        max_sequence_length=flux.defaults.max_sequence_length,
    ).images[0]  # fmt: skip
    assert np.array_equal(served, np.asarray(direct))

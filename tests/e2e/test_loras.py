"""FLUX LoRA adapters on the tiny FLUX: tiny random LoRAs made here with peft, chosen per
request on /infer, /v1/jobs and /v1/images/generations, switched without leaking."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hunyuan_service.api.app import create_app
from hunyuan_service.errors import ModelLoadError
from tests.e2e.conftest import tiny_settings
from tests.e2e.test_jobs import wait_done

BODY = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "seed": 5}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, flux: Any) -> Path:
    """Two random LoRAs for the tiny FLUX's attention layers: rank 4, and rank 2 with alpha 8."""
    from hunyuan_service.models.tiny import build_flux_lora

    folder = tmp_path_factory.mktemp("loras")
    build_flux_lora(flux.pipe.transformer, folder / "style.safetensors", seed=1)
    build_flux_lora(flux.pipe.transformer, folder / "subject.safetensors", seed=2, rank=2, alpha=8)
    return folder


@pytest.fixture(scope="module")
def client(tiny_cache: Path, lora_dir: Path) -> Iterator[TestClient]:
    settings = tiny_settings("text2image", tiny_cache, lora_dir=lora_dir, max_loras_per_request=2)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def pixels(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["image_base64"])
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def image(client: TestClient, *loras: tuple[str, float]) -> np.ndarray:
    chosen = [{"name": name, "scale": scale} for name, scale in loras]
    return pixels(client.post("/infer", json={**BODY, "loras": chosen}))


def test_adapters_change_the_image_and_switching_never_leaks(client: TestClient) -> None:
    base = image(client)
    style = image(client, ("style", 1.0))
    subject = image(client, ("subject", 1.0))
    both = image(client, ("style", 0.8), ("subject", 1.0))
    assert not np.array_equal(style, base)
    assert not np.array_equal(subject, base)
    assert not np.array_equal(style, subject)
    assert not np.array_equal(both, style)
    # Back to the base model after adapters: bit for bit, and again after each alternation.
    assert np.array_equal(image(client), base)
    assert np.array_equal(image(client, ("style", 1.0)), style)
    assert np.array_equal(image(client, ("subject", 1.0)), subject)
    assert np.array_equal(image(client, ("style", 1.0)), style)
    assert np.array_equal(image(client), base)
    # Order in the request does not matter; scale 0 is the base model.
    assert np.array_equal(image(client, ("subject", 1.0), ("style", 0.8)), both)
    assert np.array_equal(image(client, ("style", 0.0)), base)
    assert not np.array_equal(image(client, ("style", 0.5)), style)


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        ([{"name": "watercolour"}], "unknown adapter 'watercolour'; the adapters here are: style"),
        ([{"name": "style"}, {"name": "style"}], "each adapter may be named once"),
        ([{"name": "style"}, {"name": "subject"}, {"name": "x"}], "at most 2 are allowed"),
        ([{"name": "style", "scale": 9}], "less than or equal to 4"),
        ([{"name": "../style"}], "unknown adapter"),
        ([{"name": "style", "weight": 1}], "not a known field"),
    ],
)
def test_bad_choices_are_422s_that_say_what_to_fix(
    client: TestClient, loras: list[dict[str, Any]], message: str
) -> None:
    response = client.post("/infer", json={**BODY, "loras": loras})
    assert response.status_code == 422
    assert message in response.json()["error"]["message"]


def test_a_server_without_adapters_says_so(flux_client: TestClient) -> None:
    response = flux_client.post("/infer", json={**BODY, "loras": [{"name": "style"}]})
    assert response.status_code == 422
    assert "no LoRA adapters are configured" in response.json()["error"]["message"]
    assert flux_client.get("/v1/loras").json()["data"] == []


def test_listings_show_the_adapters(client: TestClient) -> None:
    listing = client.get("/v1/loras").json()
    assert listing["max_per_request"] == 2
    assert [(a["name"], a["rank"], a["text_encoder"]) for a in listing["data"]] == [
        ("style", 4, False),
        ("subject", 2, False),
    ]
    assert listing["data"][0]["source"].endswith("style.safetensors")
    assert client.get("/v1/models").json()["data"][0]["loras"] == ["style", "subject"]


def test_jobs_and_the_openai_images_endpoint_take_loras(client: TestClient) -> None:
    direct = image(client, ("subject", 0.7))
    submitted = client.post("/v1/jobs", json={**BODY, "loras": [{"name": "subject", "scale": 0.7}]})
    assert submitted.status_code == 202
    done = wait_done(client, submitted.json()["id"])
    job_image = base64.b64decode(done["result"]["image_base64"])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(job_image)), dtype=np.int16), direct)

    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)
    result = sdk.images.generate(
        prompt=BODY["prompt"],
        size="64x64",
        extra_body={"seed": BODY["seed"], "loras": [{"name": "subject", "scale": 0.7}]},
    )
    data = base64.b64decode(result.data[0].b64_json or "")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16), direct)
    with pytest.raises(openai.BadRequestError, match="unknown adapter"):
        sdk.images.generate(prompt="x", size="64x64", extra_body={"loras": [{"name": "nope"}]})


def test_only_jobs_with_the_same_adapters_share_a_batch(flux: Any) -> None:
    from hunyuan_service.models.types import Text2ImageInput

    plain = Text2ImageInput("a", 64, 64)
    styled = Text2ImageInput("b", 64, 64, loras=(("style", 1.0),))
    keys = {
        flux.batch_key(plain),
        flux.batch_key(styled),
        flux.batch_key(Text2ImageInput("c", 64, 64, loras=(("style", 0.5),))),
    }
    assert len(keys) == 3
    assert flux.batch_key(Text2ImageInput("d", 64, 64, loras=(("style", 1.0),))) == (
        flux.batch_key(styled)
    )


def broken_adapter(folder: Path, name: str, tensors: dict[str, Any] | None) -> Path:
    from safetensors.torch import save_file

    path = folder / f"{name}.safetensors"
    if tensors is None:
        path.write_bytes(b"this is not a safetensors file")
    else:
        save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    ("tensors", "said"),
    [
        (None, "LoRA 'bad'"),
        ({"transformer.x_embedder.weight": np.zeros((2, 2), dtype=np.float32)}, "changes base"),
        ({"unet.down.lora_A.weight": np.zeros((2, 2), dtype=np.float32)}, "not a FLUX LoRA"),
    ],
)
def test_a_malformed_adapter_stops_start_up_with_one_line(
    tiny_cache: Path, tmp_path: Path, tensors: dict[str, Any] | None, said: str
) -> None:
    import torch

    from hunyuan_service.models.flux import FluxModel

    as_torch = None if tensors is None else {k: torch.from_numpy(v) for k, v in tensors.items()}
    path = broken_adapter(tmp_path, "bad", as_torch)
    model = FluxModel(tiny_settings("text2image", tiny_cache, lora_dir=tmp_path))
    with pytest.raises(ModelLoadError) as caught:
        model.load()
    message = str(caught.value)
    assert said in message
    assert "\n" not in message
    assert "bad" in message or str(path) in message


def test_hot_swapping_into_a_compiled_transformer_never_recompiles(
    tiny_cache: Path, lora_dir: Path, client: TestClient
) -> None:
    """COMPILE=regional: adapters are hot-swapped into fixed slots; the graph stays the same."""
    import torch._dynamo.utils

    from hunyuan_service.models.base import JobContext
    from hunyuan_service.models.flux import FluxModel
    from hunyuan_service.models.types import Text2ImageInput

    settings = tiny_settings(
        "text2image", tiny_cache, lora_dir=lora_dir, compile="regional", warmup=["64x64"]
    )
    model = FluxModel(settings)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model.load()
    model.warm_up()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > before  # the warm-up compiled the blocks, with the slots in them

    def run(*loras: tuple[str, float]) -> np.ndarray:
        request = Text2ImageInput(**{**BODY, "loras": tuple(sorted(loras))})
        output = model.infer(request, JobContext())
        return np.asarray(output.image, dtype=np.int16)

    base = run()
    style = run(("style", 1.0))
    both = run(("style", 0.8), ("subject", 1.0))
    assert np.array_equal(run(), base)
    assert np.array_equal(run(("style", 1.0)), style)
    assert np.array_equal(run(("style", 0.0)), base)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompiles
    # The same images as the eager server's, which switches with set_adapters: up to the
    # compiler's rounding.
    for compiled, eager in (
        (base, image(client)),
        (style, image(client, ("style", 1.0))),
        (both, image(client, ("style", 0.8), ("subject", 1.0))),
    ):
        assert np.abs(compiled - eager).max() <= 2


def test_edits_take_loras_on_infer_and_the_openai_edits_endpoint(client: TestClient) -> None:
    from tests.e2e.test_image_edits import half_mask, noise, uri

    source = noise((64, 64), seed=6)
    body = {**BODY, "image": uri(source), "mask": uri(half_mask((64, 64)))}
    plain = pixels(client.post("/infer", json=body))
    chosen = [{"name": "style", "scale": 1.0}]
    styled = pixels(client.post("/infer", json={**body, "loras": chosen}))
    assert not np.array_equal(plain[:, :32], styled[:, :32])  # the adapter changed the repaint
    kept = np.asarray(source, dtype=np.int16)[:, 32:]
    assert np.array_equal(styled[:, 32:], kept)  # and nothing outside the mask

    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)
    files = {name: (f"{name}.png", io.BytesIO(), "image/png") for name in ("image", "mask")}
    source.save(files["image"][1], "PNG")
    half_mask((64, 64)).save(files["mask"][1], "PNG")
    result = sdk.images.edit(
        image=files["image"],
        mask=files["mask"],
        prompt=BODY["prompt"],
        extra_body={"seed": BODY["seed"], "loras": json.dumps(chosen)},
    )
    data = base64.b64decode(result.data[0].b64_json or "")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16), styled)

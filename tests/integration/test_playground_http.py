"""The playground's routes: served with a strict CSP, open without the API key (the API is not),
and gone with PLAYGROUND=false. The page itself is driven in a browser in tests/e2e."""

from __future__ import annotations

from fastapi.testclient import TestClient

from hunyuan_service.api.app import create_app
from tests.fakes import FakeModel, fake_settings


def test_page_and_files_carry_a_strict_csp() -> None:
    with TestClient(create_app(fake_settings(), FakeModel())) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert "http" not in page.text.replace("http-equiv", "")  # nothing from elsewhere
        script = client.get("/playground/app.js")
        assert script.headers["content-type"].startswith("text/javascript")
        assert client.get("/playground/app.css").headers["content-type"].startswith("text/css")
        assert client.get("/playground/index.html").status_code == 404
        assert client.get("/playground/..%2Fsettings.py").status_code == 404


def test_config_tells_the_page_the_limits() -> None:
    settings = fake_settings(max_image_side=1024, max_inference_steps=50)
    with TestClient(create_app(settings, FakeModel(settings))) as client:
        config = client.get("/playground/config.json").json()
    assert config == {
        "model_type": "text2image",
        "api_key_required": False,
        "min_image_side": 64,
        "max_image_side": 1024,
        "max_inference_steps": 50,
        "max_new_tokens_limit": 2048,
        "max_input_images": 8,
    }


def test_with_an_api_key_the_page_is_open_and_the_api_is_not() -> None:
    settings = fake_settings(api_key="sesame-123")
    with TestClient(create_app(settings, FakeModel(settings))) as client:
        assert client.get("/").status_code == 200
        assert client.get("/playground/config.json").json()["api_key_required"] is True
        assert client.post("/infer", json={"prompt": "x"}).status_code == 401


def test_playground_false_removes_the_page() -> None:
    settings = fake_settings(playground=False)
    with TestClient(create_app(settings, FakeModel(settings))) as client:
        assert client.get("/").status_code == 404
        assert client.get("/playground/app.js").status_code == 404
        assert client.get("/health").status_code == 200

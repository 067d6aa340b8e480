"""The playground page at `GET /`: a small form for the served model, shipped with the package.

It needs no build step and loads nothing from elsewhere; a strict Content-Security-Policy keeps
it that way. `PLAYGROUND=false` removes these routes.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from hunyuan_service.errors import NotFound

# Paths the API key does not guard: the page and its files hold no data. The page sends the
# key (from session storage) with every API call it makes.
PLAYGROUND_PATHS = frozenset(
    {"/", "/playground/app.js", "/playground/app.css", "/playground/config.json"}
)
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_FILES = {"app.js": "text/javascript", "app.css": "text/css"}
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _read(name: str) -> bytes:
    return resources.files("hunyuan_service.playground").joinpath(name).read_bytes()


@router.get("/")
async def page() -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/playground/config.json")
async def config(request: Request) -> JSONResponse:
    """The limits the page's form should respect, readable before the model has loaded."""
    settings = request.app.state.engine.settings
    return JSONResponse(
        {
            "model_type": settings.model_type,
            "api_key_required": settings.api_key is not None,
            "min_image_side": settings.min_image_side,
            "max_image_side": settings.max_image_side,
            "max_inference_steps": settings.max_inference_steps,
            "max_new_tokens_limit": settings.max_new_tokens_limit,
            "max_input_images": settings.max_input_images,
        },
        headers=_HEADERS,
    )


@router.get("/playground/{name}")
async def asset(name: str) -> Response:
    if name not in _FILES:
        raise NotFound(f"no playground file {name!r}")
    return Response(_read(name), media_type=_FILES[name], headers=_HEADERS)

"""The OpenAPI document of the API this process serves: its MODEL_TYPE's routes and bodies.

FastAPI documents what it can see: handlers here parse their bodies themselves (JSON, multipart,
SSE, raw images) and answer errors from middleware and handlers, so `describe_api` rewrites the
document per MODEL_TYPE: the routes of the other model type are left out (they only answer
404), every route lists the statuses it can answer with the service's error body, 503s carry
`Retry-After`, and streams are `text/event-stream`. Schemathesis checks the document against the
running service (tests/integration/test_openapi_fuzz.py).
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import Route

from hunyuan_service.settings import Settings

ERROR_BODY = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "string"},
                "request_id": {"type": "string"},
            },
        }
    },
}
OBJECT = {"type": "object"}
BINARY = {"type": "string", "format": "binary"}
IMAGES = {f"image/{kind}": BINARY for kind in ("png", "jpeg", "webp")}
# Server-Sent Events, described one event at a time (each `data` is JSON text).
EVENTS = {
    "type": "object",
    "description": "One event of the stream: `queued`, `started`, `progress` or `token`, then "
    "`result` or `error` (README, Streaming); `: keep-alive` comments while idle.",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": ["queued", "started", "progress", "token", "result", "error"]},
        "data": {"type": "string"},
        "id": {"type": "string"},
    },
}
RESPONSE_EVENTS = {
    "type": "object",
    "description": "One event of a response's stream: `response.created`, `response.in_progress`, "
    "the message's `response.output_item.added` and `response.content_part.added`, "
    "`response.output_text.delta` per piece of text, the matching `.done` events, then "
    "`response.completed`, `response.incomplete` or `response.failed`; each `data` is JSON text "
    "whose `type` is the event's name.",
    "required": ["event", "data"],
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
}
CHUNKS = {
    "type": "object",
    "description": "One `chat.completion.chunk` as JSON text, or `[DONE]` at the end.",
    "required": ["data"],
    "properties": {"data": {"type": "string"}},
}
ERRORS = {
    "400": "The body is not valid (OpenAI-compatible routes).",
    "401": "API_KEY is set and the request has no valid key.",
    "403": "A refused image URL or path, a cross-site browser request, or a Host not allowed.",
    "404": "No such route, job or model.",
    "406": "The Accept header allows nothing this route can send.",
    "408": "The body did not arrive within BODY_TIMEOUT_S.",
    "413": "The body or an image is over its size limit.",
    "415": "The body is neither JSON nor multipart.",
    "422": "A field is invalid; `param` names it.",
    "500": "An unexpected error; the log has the request id.",
    "503": "Not admitted: the queue is full, or the service is starting or draining.",
    "504": "The request's deadline passed.",
}
BODY_ERRORS = ("400", "401", "403", "406", "408", "413", "415", "422", "500", "503", "504")
READ_ERRORS = ("401", "403", "404", "406", "500")


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with nested definitions inlined, so it stands alone in OpenAPI."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)


def _errors(*codes: str) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for code in codes:
        entry: dict[str, Any] = {
            "description": ERRORS[code],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        if code == "503":
            entry["headers"] = {
                "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
            }
        responses[code] = entry
    return responses


def _ok(description: str, content: dict[str, Any]) -> dict[str, Any]:
    """A success response; `content` maps media types to schemas."""
    return {
        "description": description,
        "content": {media: {"schema": schema} for media, schema in content.items()},
    }


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": inline_schema(model)}}}


def _image2text_body(model: type[BaseModel]) -> dict[str, Any]:
    """JSON, or a multipart form whose `images` are file uploads."""
    body = _json_body(model)
    form = inline_schema(model)
    form["properties"]["images"] = {"type": "array", "items": BINARY}
    form["properties"]["videos"] = {"type": "array", "items": BINARY}
    form["properties"]["response_format"] = {"type": "string", "description": "JSON text"}
    body["content"]["multipart/form-data"] = {"schema": form}
    return body


def _image_edit_form() -> dict[str, Any]:
    """OpenAI's images.edit form: the image and mask as files, the rest as form fields."""
    from hunyuan_service.api import openai_schemas

    form = inline_schema(openai_schemas.ImageEditRequest)
    form["properties"]["image"] = BINARY
    form["properties"]["mask"] = BINARY
    form["properties"]["loras"] = {"type": "string", "description": "JSON text"}
    form.setdefault("required", []).append("image")
    return {"required": True, "content": {"multipart/form-data": {"schema": form}}}


def _routes(settings: Settings) -> dict[tuple[str, str], dict[str, Any]]:
    """Each served (path, method): its request body, if any, and its responses."""
    from hunyuan_service.api import openai_schemas, schemas

    text2image = settings.model_type == "text2image"
    result_json = inline_schema(schemas.Text2ImageResponse) if text2image else IMAGE2TEXT_RESPONSE
    infer_ok = (
        _ok(
            "The image: JSON, raw bytes for Accept: image/*, or events with stream=true.",
            {"application/json": result_json, **IMAGES, "text/event-stream": EVENTS},
        )
        if text2image
        else _ok(
            "The answer: JSON, or events with stream=true.",
            {"application/json": result_json, "text/event-stream": EVENTS},
        )
    )
    if text2image:
        infer_body = _json_body(schemas.Text2ImageRequest)
        job_body = _json_body(schemas.Text2ImageJobRequest)
    else:
        infer_body = _image2text_body(schemas.Image2TextRequest)
        job_body = _image2text_body(schemas.Image2TextJobRequest)
    status = _ok("The service's state.", {"application/json": OBJECT})
    routes: dict[tuple[str, str], dict[str, Any]] = {
        ("/infer", "post"): {
            "requestBody": infer_body,
            "responses": {"200": infer_ok, **_errors(*BODY_ERRORS)},
        },
        ("/health", "get"): {
            "responses": {
                "200": status,
                "503": _ok("The worker has died.", {"application/json": OBJECT}),
            }
        },
        ("/ready", "get"): {
            "responses": {"200": status, "503": _ok("Not ready now.", {"application/json": OBJECT})}
        },
        ("/metrics", "get"): {
            "responses": {
                "200": _ok("Prometheus text format.", {"text/plain": {"type": "string"}}),
                **_errors("401", "403"),
            }
        },
        ("/v1/jobs", "post"): {
            "requestBody": job_body,
            "responses": {
                "202": _ok("Admitted; Location names the job.", {"application/json": OBJECT}),
                **_errors(*BODY_ERRORS),
            },
        },
        ("/v1/jobs/{job_id}", "get"): {
            "responses": {
                "200": _ok(
                    "The job's status; a finished job carries the /infer result.",
                    {"application/json": OBJECT, **(IMAGES if text2image else {})},
                ),
                **_errors(*READ_ERRORS),
            }
        },
        ("/v1/jobs/{job_id}", "delete"): {
            "responses": {
                "200": _ok("The job, cancelled or already finished.", {"application/json": OBJECT}),
                **_errors(*READ_ERRORS),
            }
        },
        ("/v1/jobs/{job_id}/events", "get"): {
            "responses": {
                "200": _ok("The job's events, replayed then live.", {"text/event-stream": EVENTS}),
                **_errors(*READ_ERRORS),
            }
        },
        ("/v1/models", "get"): {
            "responses": {
                "200": _ok("The one model served.", {"application/json": OBJECT}),
                **_errors("401", "403", "500"),
            }
        },
        ("/v1/models/{model}", "get"): {
            "responses": {
                "200": _ok("The model, if it is the one served.", {"application/json": OBJECT}),
                **_errors("401", "403", "404", "500"),
            }
        },
    }
    if text2image:
        routes[("/v1/images/generations", "post")] = {
            "requestBody": _json_body(openai_schemas.ImageGenerationRequest),
            "responses": {
                "200": _ok("OpenAI's images response (b64_json).", {"application/json": OBJECT}),
                **_errors(*BODY_ERRORS, "404"),
            },
        }
        routes[("/v1/images/edits", "post")] = {
            "requestBody": _image_edit_form(),
            "responses": {
                "200": _ok("OpenAI's images response (b64_json).", {"application/json": OBJECT}),
                **_errors(*BODY_ERRORS, "404"),
            },
        }
        routes[("/v1/loras", "get")] = {
            "responses": {
                "200": _ok("The LoRA adapters requests may name.", {"application/json": OBJECT}),
                **_errors("401", "403", "500"),
            }
        }
    else:
        routes[("/v1/chat/completions", "post")] = {
            "requestBody": _json_body(openai_schemas.ChatCompletionRequest),
            "responses": {
                "200": _ok(
                    "OpenAI's chat.completion, or chat.completion.chunk events with stream=true.",
                    {"application/json": OBJECT, "text/event-stream": CHUNKS},
                ),
                **_errors(*BODY_ERRORS, "404"),
            },
        }
        routes[("/v1/responses", "post")] = {
            "requestBody": _json_body(openai_schemas.ResponsesRequest),
            "responses": {
                "200": _ok(
                    "OpenAI's response object, or its stream's events with stream=true.",
                    {"application/json": OBJECT, "text/event-stream": RESPONSE_EVENTS},
                ),
                **_errors(*BODY_ERRORS, "404"),
            },
        }
    return routes


IMAGE2TEXT_RESPONSE = {
    "type": "object",
    "required": ["text", "finish_reason", "usage", "timings"],
    "properties": {
        "text": {"type": "string"},
        "finish_reason": {"enum": ["stop", "length"]},
        "usage": {
            "type": "object",
            "properties": {
                "prompt_tokens": {"type": "integer"},
                "completion_tokens": {"type": "integer"},
                "total_tokens": {"type": "integer"},
            },
        },
        "timings": OBJECT,
    },
}


def describe_api(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The OpenAPI document for this process's MODEL_TYPE (cached on the app by `install`)."""
    document = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    served = _routes(settings)
    plain = {  # Starlette routes (/infer), which get_openapi skips; first, as they are served
        route.path: {
            method.lower(): {
                "summary": route.name.replace("_", " ").title(),
                "description": (inspect.getdoc(route.endpoint) or "").split("\n\n")[0],
                "operationId": f"{route.name}_{method.lower()}",
            }
            for method in sorted(route.methods or ())
            if method != "HEAD"
        }
        for route in app.routes
        if isinstance(route, Route) and not isinstance(route, APIRoute) and route.include_in_schema
    }
    document["paths"] = {**plain, **document["paths"]}
    paths: dict[str, Any] = {}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            spec = served.get((path, method))
            if spec is None:
                continue  # the other model type's route: it only answers 404 here
            operation.pop("requestBody", None)
            operation.update(spec)
            paths.setdefault(path, {})[method] = operation
    document["paths"] = paths
    document.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_BODY
    return document


def install(app: FastAPI, settings: Settings) -> None:
    """Serves `describe_api` at /openapi.json (and so /docs), built once on first use."""
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "document" not in cache:
            cache["document"] = describe_api(app, settings)
        return cache["document"]

    app.openapi = openapi  # type: ignore[method-assign]

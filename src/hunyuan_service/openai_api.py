"""OpenAI-compatible endpoints: /v1/models, /v1/chat/completions and /v1/images/generations.

They share the queue, deadlines and cancellation with /infer; only the wire format differs.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hunyuan_service.errors import NotFound, ServiceError, error_body
from hunyuan_service.http_io import json_bytes, json_object, parse_json, read_body, scheduler_for
from hunyuan_service.image2text_api import decode_images, usage
from hunyuan_service.imageio import base64_json_string
from hunyuan_service.jobs import Job
from hunyuan_service.media import ImageSource
from hunyuan_service.models.flux import Text2ImageInput, Text2ImageOutput
from hunyuan_service.models.qwen_vl import ChatMessage, Image2TextInput, Image2TextOutput
from hunyuan_service.openai_schemas import ChatCompletionRequest, ImageGenerationRequest
from hunyuan_service.service import Service, ServiceDep, request_id_of
from hunyuan_service.streaming import (
    KEEPALIVE,
    SSE_HEADERS,
    JobEvents,
    job_events,
    submit_and_respond,
)

router = APIRouter(prefix="/v1")

OTHER_ENDPOINT = {
    "text2image": "this server runs MODEL_TYPE=text2image; use POST /v1/images/generations",
    "image2text": "this server runs MODEL_TYPE=image2text; use POST /v1/chat/completions",
}


def _require(service: Service, model_type: str, model: str | None) -> None:
    if service.settings.model_type != model_type:
        raise NotFound(OTHER_ENDPOINT[service.settings.model_type], code="wrong_model_type")
    if model is not None and model != service.settings.model_id:
        raise NotFound(
            f"model {model!r} is not served here; use {service.settings.model_id!r} "
            "(see GET /v1/models)",
            param="model",
            code="model_not_found",
        )


@router.get("/models")
async def list_models(service: ServiceDep) -> JSONResponse:
    """Lists the one loaded model, with MODEL_ID as its id."""
    entry = {
        "id": service.settings.model_id,
        "object": "model",
        "created": int(service.started_at),
        "owned_by": "hunyuan-service",
    }
    return JSONResponse({"object": "list", "data": [entry]})


# -- chat completions (image2text) -----------------------------------------------------------


@router.post("/chat/completions", response_model=None)
async def chat_completions(request: Request, service: ServiceDep) -> Response:
    """Chat with text and image_url parts, streamed or not."""
    _require(service, "image2text", None)
    scheduler = scheduler_for(service)
    settings = service.settings
    body = await read_body(request, settings.max_body_bytes)
    params: ChatCompletionRequest = await parse_json(
        body, ChatCompletionRequest, service, status_400=True
    )
    _require(service, "image2text", params.model)
    sources: list[list[ImageSource]] = []
    texts: list[str] = []
    for i, message in enumerate(params.messages):
        parts = message.content if isinstance(message.content, list) else []
        texts.append(
            message.content
            if isinstance(message.content, str)
            else "\n".join(part.text or "" for part in parts if part.type == "text")
        )
        sources.append(
            [
                ImageSource(part.image_url.url, f"messages[{i}].content[{j}].image_url")
                for j, part in enumerate(parts)
                if part.type == "image_url" and part.image_url is not None
            ]
        )
    flat = [source for group in sources for source in group]
    with scheduler.reserve() as reservation:
        images = iter(await decode_images(service, flat))
        messages = tuple(
            ChatMessage(role=m.role, text=text, images=tuple(next(images) for _ in group))
            for m, text, group in zip(params.messages, texts, sources, strict=True)
        )
        payload = Image2TextInput(
            messages=messages,
            max_new_tokens=params.token_budget(settings),
            temperature=params.temperature or 0.0,
            top_p=params.top_p,
            seed=params.seed,
            stop=tuple(params.stop or ()),
        )
        request_id = request_id_of(request)
        completion_id = f"chatcmpl-{request_id}"
        created = int(time.time())
        model_id = settings.model_id
        if not params.stream:

            async def render(output: Image2TextOutput, _job: Job) -> bytes:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": output.text},
                    "finish_reason": output.finish_reason,
                    "logprobs": None,
                }
                return json_bytes(
                    {
                        "id": completion_id,
                        "object": "chat.completion",
                        "created": created,
                        "model": model_id,
                        "choices": [choice],
                        "usage": usage(output),
                    }
                )

            return await submit_and_respond(
                request,
                service,
                payload,
                timeout_s=None,
                stream=False,
                render=render,
                reservation=reservation,
            )
        events = JobEvents()
        job = scheduler.submit(payload, request_id, sink=events.sink, reservation=reservation)

    include_usage = bool(params.stream_options and params.stream_options.include_usage)
    stops = list(params.stop or ())

    def chunk(choices: list[dict[str, Any]], usage_body: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": choices,
        }
        if include_usage:
            body["usage"] = usage_body
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    def delta(content: dict[str, Any], finish: str | None = None) -> str:
        return chunk([{"index": 0, "delta": content, "finish_reason": finish, "logprobs": None}])

    async def stream() -> AsyncIterator[str]:
        yield delta({"role": "assistant", "content": ""})
        holdback = _StopHoldback(stops)
        async for kind, data in job_events(scheduler, job, events, settings.stream_keepalive_s):
            if kind == "keepalive":
                yield KEEPALIVE
            elif kind == "token":
                text = holdback.feed(data["text"])
                if text:
                    yield delta({"content": text})
            elif kind == "result":
                tail = holdback.flush()
                if tail:
                    yield delta({"content": tail})
                yield delta({}, data.finish_reason)
                if include_usage:
                    yield chunk([], usage(data))
            elif kind == "error":
                assert isinstance(data, ServiceError)
                yield f"data: {json.dumps(error_body(data, request_id))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


class _StopHoldback:
    """Holds back streamed text that might be the start of a stop sequence; cuts at a match."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.keep = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        cut = max(len(self.pending) - self.keep, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


# -- image generations (text2image) ----------------------------------------------------------


@router.post("/images/generations", response_model=None)
async def images_generations(request: Request, service: ServiceDep) -> Response:
    """Generates `n` images in one job; the response carries them as b64_json."""
    _require(service, "text2image", None)
    scheduler_for(service)  # refuse at once while starting or draining, before reading the body
    body = await read_body(request, service.settings.max_body_bytes)
    params: ImageGenerationRequest = await parse_json(
        body, ImageGenerationRequest, service, status_400=True
    )
    _require(service, "text2image", params.model)
    width, height = params.dimensions
    payload = Text2ImageInput(
        prompt=params.prompt,
        width=width,
        height=height,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        seed=params.seed,
        count=params.n,
    )

    async def render(output: Text2ImageOutput, _job: Job) -> bytes:
        extra = {"output_format": params.output_format, "size": params.size, "seed": output.seed}
        return await service.run_cpu(_images_json, output.images, params, extra)

    return await submit_and_respond(
        request, service, payload, timeout_s=None, stream=False, render=render
    )


def _images_json(images: Any, params: ImageGenerationRequest, extra: dict[str, Any]) -> bytes:
    """Encodes every image and builds the whole body in one CPU-pool call."""
    items = [
        json_object(
            {"revised_prompt": params.prompt},
            {"b64_json": base64_json_string(image, params.output_format)},
        )
        for image in images
    ]
    data = b"[" + b",".join(items) + b"]"
    return json_object({"created": int(time.time()), **extra}, {"data": data})

"""OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/images/generations and
/v1/images/edits, and /v1/loras, the adapters text2image requests may name.

They share the queue, deadlines and cancellation with /infer; only the wire format differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hunyuan_service.api.body import (
    is_multipart,
    parse_json,
    read_body,
    read_multipart,
    wait_for_disconnect,
)
from hunyuan_service.api.deps import EngineDep, request_id_of
from hunyuan_service.api.encoding import base64_json_string, encode_image, json_bytes, json_object
from hunyuan_service.api.image2text import (
    MAX_ASPECT_RATIO,
    compile_grammar,
    decode_images,
    usage,
)
from hunyuan_service.api.openai_schemas import (
    ChatCompletionRequest,
    ImageEditRequest,
    ImageGenerationRequest,
)
from hunyuan_service.api.renderers import KEEPALIVE, SSE_HEADERS
from hunyuan_service.api.text2image import prepare_edit, to_model_input
from hunyuan_service.api.tool_calls import (
    CallHoldback,
    ToolCall,
    call_grammar,
    parse_calls,
    with_tools,
)
from hunyuan_service.engine.engine import Engine, JobHandle
from hunyuan_service.engine.events import Failed, Heartbeat, Succeeded, Token
from hunyuan_service.engine.jobs import StopReason
from hunyuan_service.errors import (
    BadRequest,
    InvalidInput,
    NotFound,
    UnsupportedMediaType,
    error_body,
)
from hunyuan_service.media import ImageSource
from hunyuan_service.models.grammar import compile_tool_calls
from hunyuan_service.models.types import (
    ChatMessage,
    Image2TextInput,
    Image2TextOutput,
    OutputGrammar,
)

router = APIRouter(prefix="/v1")

OTHER_ENDPOINT = {
    "text2image": "this server runs MODEL_TYPE=text2image; use POST /v1/images/generations",
    "image2text": "this server runs MODEL_TYPE=image2text; use POST /v1/chat/completions",
}


def require_model(engine: Engine, model_type: str, model: str | None) -> None:
    if engine.settings.model_type != model_type:
        raise NotFound(OTHER_ENDPOINT[engine.settings.model_type], code="wrong_model_type")
    if model is not None and model != engine.settings.model_id:
        raise NotFound(
            f"model {model!r} is not served here; use {engine.settings.model_id!r} "
            "(see GET /v1/models)",
            param="model",
            code="model_not_found",
        )


@router.get("/models")
async def list_models(engine: EngineDep) -> JSONResponse:
    """Lists the one loaded model, with MODEL_ID as its id."""
    return JSONResponse({"object": "list", "data": [_model_entry(engine)]})


@router.get("/models/{model:path}")
async def retrieve_model(model: str, engine: EngineDep) -> JSONResponse:
    """The model, by its id (MODEL_ID, which may hold a slash: `org/name`); the SDK's
    `models.retrieve`."""
    require_model(engine, engine.settings.model_type, model)
    return JSONResponse(_model_entry(engine))


def _model_entry(engine: Engine) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": engine.settings.model_id,
        "object": "model",
        "created": int(engine.started_at),
        "owned_by": "hunyuan-service",
    }
    if engine.settings.model_type == "text2image":
        entry["loras"] = engine.settings.lora_names  # details at GET /v1/loras
    return entry


@router.get("/loras")
async def list_loras(engine: EngineDep) -> JSONResponse:
    """The LoRA adapters a text2image request may name in `loras`, with where each came from
    and its rank (known once the model has loaded)."""
    require_model(engine, "text2image", None)
    extra = engine.model.info.extra if engine.model is not None else {}
    loaded = {a["name"]: a for a in extra.get("loras", [])}
    data = [
        {"object": "lora", **loaded.get(name, {"name": name})}
        for name in engine.settings.lora_names
    ]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "max_per_request": engine.settings.max_loras_per_request,
        }
    )


# -- chat completions (image2text) -----------------------------------------------------------


@router.post("/chat/completions", response_model=None)
async def chat_completions(request: Request, engine: EngineDep) -> Response:
    """Chat with text and image_url parts, streamed or not."""
    require_model(engine, "image2text", None)
    engine.check_ready()
    settings = engine.settings
    body = await read_body(request, engine)
    params: ChatCompletionRequest = await parse_json(
        body, ChatCompletionRequest, engine, status_400=True
    )
    require_model(engine, "image2text", params.model)
    handles = await submit_chat(request, engine, params)
    completion = _Completion(handles, settings.model_id, params)
    if not params.stream:
        outputs = await results(handles, request)
        return Response(completion.message(outputs), media_type="application/json")
    stream = completion.chunks(settings.stream_keepalive_s)
    return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)


async def submit_chat(
    request: Request, engine: Engine, params: ChatCompletionRequest
) -> list[JobHandle]:
    """Decodes a chat's images and videos, compiles its grammar and queues it: one job for each
    of its `n` choices, each with a queue place of its own, taken before anything is decoded
    (all or none: a queue without room for every choice refuses the request). Choice i samples
    with `seed + i`, so each is the answer that seed gives alone. `/v1/responses` sends its
    conversations here too."""
    settings = engine.settings
    texts, sources, video_sources = params.texts_and_images
    flat = [ImageSource(url, param, pixels=px) for group in sources for url, param, px in group]
    flat += [
        ImageSource(url, param, video=params.video_sampling(px, settings))
        for group in video_sources
        for url, param, px in group
    ]
    grammar = await _chat_grammar(engine, params)
    with contextlib.ExitStack() as places:
        reservations = [places.enter_context(engine.reserve()) for _ in range(params.n or 1)]
        media = iter(await decode_images(engine, flat, request, max_ratio=MAX_ASPECT_RATIO))
        images = [tuple(next(media) for _ in group) for group in sources]
        videos = [tuple(next(media) for _ in group) for group in video_sources]
        messages = tuple(
            ChatMessage(m.role, text, found, clips, tuple(px for _, _, px in group))
            for m, text, found, clips, group in zip(
                params.messages, texts, images, videos, sources, strict=True
            )
        )
        roles = [m.role for m in params.messages]
        messages = with_tools(messages, roles, params.tools_prompt)
        payload = Image2TextInput(
            messages=messages,
            max_new_tokens=params.token_budget(settings),
            temperature=params.temperature or 0.0,
            top_p=params.top_p,
            seed=params.seed,
            stop=tuple(params.stop or ()),
            grammar=grammar,
            **params.pixel_bounds(),
        )
        handles: list[JobHandle] = []
        try:
            for index, reservation in enumerate(reservations):
                seed = None if params.seed is None else (params.seed + index) % 2**63
                handles.append(
                    engine.submit(
                        dataclasses.replace(payload, seed=seed),
                        request_id_of(request),
                        reservation=reservation,
                        observed=params.stream,
                    )
                )
        except BaseException:
            for handle in handles:  # all or none
                handle.cancel(StopReason.CLIENT_GONE)
            raise
        return handles


async def _chat_grammar(engine: Engine, params: ChatCompletionRequest) -> OutputGrammar | None:
    """The grammar of the answer: calls where the request requires them, calls or the
    response_format where tools are offered beside one, else the response_format's."""
    constrained = params.response_format is not None and params.response_format.constrains
    functions = params.forced_calls or (params.functions if constrained else [])
    if not functions:
        return await compile_grammar(engine, params.response_format)
    answer = None
    if not params.forced_calls and params.response_format is not None:
        spec = params.response_format.json_schema
        answer = {"type": "object"} if spec is None else spec.schema_
    extra = engine.model.info.extra if engine.model is not None else {}
    parallel = params.parallel_tool_calls is not False
    lark = call_grammar(functions, parallel, answer, bool(extra.get("tool_call_tokens")))
    where = {tool.function.name: index for index, tool in enumerate(params.tools or [])}
    schemas = [(where[f.name], f.name, f.parameters) for f in functions]
    return await engine.run_cpu(compile_tool_calls, schemas, lark)


def answer_calls(
    params: ChatCompletionRequest, output: Image2TextOutput
) -> tuple[str | None, list[ToolCall]]:
    """The answer's content and the tool calls it made (none where no tools were offered, or
    where its token budget cut it short)."""
    names = [function.name for function in params.functions]
    if not names or output.finish_reason == "length":
        return output.text, []
    return parse_calls(output.text, names)


async def results(handles: list[JobHandle], request: Request) -> list[Image2TextOutput]:
    """Every choice's output, one client-disconnect watch for all; the first error (a deadline,
    a cancel) is the request's, and stops the other choices."""
    if len(handles) == 1:
        return [await handles[0].result(functools.partial(wait_for_disconnect, request))]
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        return list(
            await asyncio.gather(
                *(handle.result(lambda: asyncio.shield(gone)) for handle in handles)
            )
        )
    except BaseException:
        for handle in handles:  # the request is answered with the error: no one reads the rest
            handle.cancel(StopReason.CLIENT_GONE)
        raise
    finally:
        gone.cancel()


def usage_of(outputs: list[Image2TextOutput]) -> dict[str, int]:
    """The counts of all choices: their one prompt, and every choice's completion."""
    completion = sum(output.completion_tokens for output in outputs)
    return usage(dataclasses.replace(outputs[0], completion_tokens=completion))


async def _events(handles: list[JobHandle], heartbeat_s: float) -> AsyncIterator[tuple[int, Any]]:
    """The events of every choice's job as they come, each with its choice's index."""
    if len(handles) == 1:
        async for _number, event in handles[0].events(0, heartbeat_s):
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(index: int, handle: JobHandle) -> None:
        try:
            async for _number, event in handle.events(0, heartbeat_s):
                queue.put_nowait((index, event))
        finally:
            queue.put_nowait((index, done))

    tasks = [asyncio.create_task(pump(i, handle)) for i, handle in enumerate(handles)]
    try:
        running = len(tasks)
        while running:
            index, event = await queue.get()
            if event is done:
                running -= 1
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()


class _Completion:
    """Renders a chat's jobs, one a choice, as OpenAI's `chat.completion` body or its
    `chat.completion.chunk`s."""

    def __init__(
        self, handles: list[JobHandle], model_id: str, params: ChatCompletionRequest
    ) -> None:
        self.handles = handles
        self.request_id = handles[0].request_id
        self.id = f"chatcmpl-{self.request_id}"
        self.created = int(time.time())
        self.model_id = model_id
        self.include_usage = bool(params.stream_options and params.stream_options.include_usage)
        self.stops = list(params.stop or ())
        self.params = params

    def choice(self, index: int, output: Image2TextOutput) -> dict[str, Any]:
        content, calls = answer_calls(self.params, output)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [call.as_chat() for call in calls]
        return {
            "index": index,
            "message": message,
            "finish_reason": "tool_calls" if calls else output.finish_reason,
            "logprobs": None,
        }

    def message(self, outputs: list[Image2TextOutput]) -> bytes:
        return json_bytes(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model_id,
                "choices": [self.choice(i, output) for i, output in enumerate(outputs)],
                "usage": usage_of(outputs),
            }
        )

    def chunk(self, choices: list[dict[str, Any]], usage_body: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model_id,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage_body
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    def delta(self, index: int, content: dict[str, Any], finish: str | None = None) -> str:
        return self.chunk(
            [{"index": index, "delta": content, "finish_reason": finish, "logprobs": None}]
        )

    async def chunks(self, heartbeat_s: float) -> AsyncIterator[str | bytes]:
        """The stream, every choice's chunks as they come; dropping it cancels the jobs, like
        any client that leaves. A choice that fails ends the stream with its error."""
        count = len(self.handles)
        try:
            for index in range(count):
                yield self.delta(index, {"role": "assistant", "content": ""})
            stops = [_StopHoldback(self.stops) for _ in range(count)]
            # A call is sent whole, once its answer is.
            held = [CallHoldback() if self.params.functions else None for _ in range(count)]
            outputs: dict[int, Image2TextOutput] = {}
            async for index, event in _events(self.handles, heartbeat_s):
                holdback, calls_held = stops[index], held[index]
                if isinstance(event, Heartbeat):
                    yield KEEPALIVE
                elif isinstance(event, Token):
                    text = holdback.feed(event.text)
                    text = calls_held.feed(text) if calls_held else text
                    if text:
                        yield self.delta(index, {"content": text})
                elif isinstance(event, Succeeded):
                    output = outputs[index] = event.output
                    tail = holdback.flush()
                    _, calls = answer_calls(self.params, output)
                    if calls_held:
                        calls_held.feed(tail)
                        tail = calls_held.finish(calls)
                    if tail:
                        yield self.delta(index, {"content": tail})
                    if calls:
                        deltas = [call.as_chat(i) for i, call in enumerate(calls)]
                        yield self.delta(index, {"tool_calls": deltas})
                    yield self.delta(index, {}, "tool_calls" if calls else output.finish_reason)
                elif isinstance(event, Failed):
                    body = error_body(event.error, self.request_id)
                    yield f"data: {json.dumps(body)}\n\n"
                    break
            if self.include_usage and len(outputs) == count:
                yield self.chunk([], usage_of([outputs[i] for i in range(count)]))
            yield "data: [DONE]\n\n"
        finally:
            for handle in self.handles:
                handle.cancel(StopReason.CLIENT_GONE)


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
async def images_generations(request: Request, engine: EngineDep) -> Response:
    """Generates `n` images in one job; the response carries them as b64_json."""
    require_model(engine, "text2image", None)
    engine.check_ready()  # refuse at once while starting or draining, before reading the body
    body = await read_body(request, engine)
    params: ImageGenerationRequest = await parse_json(
        body, ImageGenerationRequest, engine, status_400=True
    )
    require_model(engine, "text2image", params.model)
    size = params.dimensions or (1024, 1024)  # `size` always has a value here
    handle = engine.submit(to_model_input(params, size), request_id_of(request))
    output = await handle.result(functools.partial(wait_for_disconnect, request))
    extra = {"output_format": params.output_format, "size": params.size, "seed": output.seed}
    data = await engine.run_cpu(_images_json, output.images, params, extra)
    return Response(data, media_type="application/json")


# The form's file parts of `images.edit`: one image (`image`, or `image[]` from a list) and an
# optional mask.
EDIT_FILES = {"image": "image", "image[]": "image", "mask": "mask"}


@router.post("/images/edits", response_model=None)
async def images_edits(request: Request, engine: EngineDep) -> Response:
    """Edits one image, `n` times: image-to-image, or inpainting with a mask. A multipart form,
    as OpenAI's SDK sends it; the response carries the images as b64_json."""
    require_model(engine, "text2image", None)
    engine.check_ready()
    if not is_multipart(request):
        raise UnsupportedMediaType(
            "images/edits takes multipart/form-data with the image as a file, as OpenAI's "
            "images.edit sends it; for a JSON body use POST /infer with image and mask"
        )
    try:
        params, files = await read_multipart(request, engine, ImageEditRequest, EDIT_FILES, 2)
        require_model(engine, "text2image", params.model)
        images, masks = files.get("image", []), files.get("mask", [])
        if len(images) != 1:
            raise InvalidInput("image: send exactly one image to edit", param="image")
        sources = [ImageSource(images[0].value, "image")]
        if masks:
            sources.append(ImageSource(masks[0].value, "mask", mask=True))
        with engine.reserve() as reservation:
            edit, (width, height) = await prepare_edit(
                engine, sources, params.dimensions, params.strength, request
            )
            payload = to_model_input(params, (width, height), edit)
            handle = engine.submit(payload, request_id_of(request), reservation=reservation)
    except InvalidInput as error:  # OpenAI answers a bad request with 400, not 422
        raise BadRequest(error.message, param=error.param) from None
    output = await handle.result(functools.partial(wait_for_disconnect, request))
    extra = {"output_format": params.output_format, "size": f"{width}x{height}"}
    data = await engine.run_cpu(_images_json, output.images, params, {**extra, "seed": output.seed})
    return Response(data, media_type="application/json")


def _images_json(images: Any, params: ImageGenerationRequest, extra: dict[str, Any]) -> bytes:
    """Encodes every image and builds the whole body in one CPU-pool call."""
    items = [
        json_object(
            {"revised_prompt": params.prompt, "seed": (extra["seed"] + i) % 2**63},
            {"b64_json": base64_json_string(encode_image(image, params.output_format))},
        )
        for i, image in enumerate(images)
    ]
    data = b"[" + b",".join(items) + b"]"
    return json_object({"created": int(time.time()), **extra}, {"data": data})

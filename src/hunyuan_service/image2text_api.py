"""/infer for image2text: JSON or multipart bodies, safe image intake, the queue, JSON or SSE."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.types import Message, Receive

from hunyuan_service.errors import InvalidInput, PayloadTooLarge
from hunyuan_service.http_io import (
    is_multipart,
    json_bytes,
    parse_json,
    read_body,
    scheduler_for,
    wants_event_stream,
)
from hunyuan_service.jobs import Job
from hunyuan_service.media import ImageSource, load_images
from hunyuan_service.models.qwen_vl import ChatMessage, Image2TextInput, Image2TextOutput
from hunyuan_service.schemas import Image2TextRequest, describe_validation_errors
from hunyuan_service.service import Service
from hunyuan_service.streaming import submit_and_respond


async def infer_image2text(request: Request, service: Service) -> Response:
    scheduler = scheduler_for(service)
    settings = service.settings
    if is_multipart(request):
        params, sources = await _read_multipart(request, service)
    else:
        body = await read_body(request, settings.max_body_bytes)
        params = await parse_json(body, Image2TextRequest, service)
        sources = [ImageSource(v, f"images[{i}]") for i, v in enumerate(params.images)]
    # Hold a queue place before decoding, so a request that cannot be served costs no decoding.
    with scheduler.reserve() as reservation:
        images = await decode_images(service, sources)
        return await submit_and_respond(
            request,
            service,
            to_model_input(params, images),
            timeout_s=params.timeout_s,
            stream=wants_event_stream(request, params.stream),
            render=render_text,
            reservation=reservation,
        )


async def decode_images(service: Service, sources: list[ImageSource]) -> list[Any]:
    """Fetches and decodes client images on the CPU pool; a text-only request skips the hop."""
    if not sources:
        return []
    return await service.run_cpu(load_images, sources, service.settings)


async def render_text(output: Image2TextOutput, job: Job) -> bytes:
    # A text answer is small enough to serialise on the loop; a thread hop would cost more.
    return json_bytes(
        {
            "text": output.text,
            "finish_reason": output.finish_reason,
            "usage": usage(output),
            "timings": job.timings(),
        }
    )


def usage(output: Image2TextOutput) -> dict[str, int]:
    return {
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "total_tokens": output.prompt_tokens + output.completion_tokens,
    }


def to_model_input(params: Image2TextRequest, images: list[Any]) -> Image2TextInput:
    return Image2TextInput(
        messages=(ChatMessage(role="user", text=params.prompt, images=tuple(images)),),
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty,
        seed=params.seed,
    )


async def _read_multipart(
    request: Request, service: Service
) -> tuple[Image2TextRequest, list[ImageSource]]:
    """Parses `-F prompt=... -F images=@cat.jpg ...`; the body cap holds for chunked uploads too."""
    settings = service.settings
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise PayloadTooLarge(
            f"the body is {declared} bytes; at most {settings.max_body_bytes} are accepted"
        )
    limited = Request(
        request.scope, receive=_capped_receive(request.receive, settings.max_body_bytes)
    )
    form = await limited.form(
        max_files=settings.max_input_images,
        max_fields=64,
        max_part_size=max(settings.max_prompt_chars * 4, settings.max_image_bytes * 2),
    )
    try:
        fields: dict[str, Any] = {}
        sources: list[ImageSource] = []
        for key, value in form.multi_items():
            if key in ("images", "image", "images[]"):
                param = f"images[{len(sources)}]"
                if isinstance(value, UploadFile):
                    data = await value.read(settings.max_image_bytes + 1)
                    sources.append(ImageSource(data, param))
                else:
                    sources.append(ImageSource(value, param))
            elif isinstance(value, UploadFile):
                raise InvalidInput(f"{key}: unexpected file; upload images as 'images'", param=key)
            else:
                fields[key] = value
        try:
            params = Image2TextRequest.model_validate(fields, context={"settings": settings})
        except ValidationError as error:
            message, bad_field = describe_validation_errors(list(error.errors()))
            raise InvalidInput(message, param=bad_field) from None
        if len(sources) > settings.max_input_images:
            raise InvalidInput(
                f"{len(sources)} images sent; at most {settings.max_input_images} are allowed",
                param="images",
            )
        return params, sources
    finally:
        await form.close()


def _capped_receive(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLarge(f"the body is over {limit} bytes, the most accepted")
        return message

    return capped

"""OpenAI's Responses API on image2text: `POST /v1/responses`, as the official SDK's
`responses.create`, `responses.stream` and `responses.parse` call it.

A request becomes a chat: `instructions` the system message, then the messages of `input`. The
chat API's validation, image intake, grammar and queue then run as they are, so both APIs keep
one set of limits; an error names this API's fields. Nothing is stored: the whole conversation
travels in `input`, and `previous_response_id` is refused.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from hunyuan_service.api.body import parse_json, read_body, wait_for_disconnect
from hunyuan_service.api.deps import EngineDep
from hunyuan_service.api.encoding import json_bytes
from hunyuan_service.api.image2text import usage
from hunyuan_service.api.openai_routes import answer_calls, require_model, submit_chat
from hunyuan_service.api.openai_schemas import ChatCompletionRequest, ResponsesRequest
from hunyuan_service.api.renderers import KEEPALIVE, SSE_HEADERS
from hunyuan_service.api.schemas import describe_validation_errors
from hunyuan_service.api.tool_calls import CallHoldback, ToolCall
from hunyuan_service.engine.engine import Engine, JobHandle
from hunyuan_service.engine.events import Failed, Heartbeat, Succeeded, Token
from hunyuan_service.engine.jobs import StopReason
from hunyuan_service.errors import BadRequest, ServiceError, error_body
from hunyuan_service.models.types import Image2TextOutput

router = APIRouter(prefix="/v1")


@router.post("/responses", response_model=None)
async def create_response(request: Request, engine: EngineDep) -> Response:
    """A response to a conversation of text and images, streamed as events or not."""
    require_model(engine, "image2text", None)
    engine.check_ready()
    body = await read_body(request, engine)
    params: ResponsesRequest = await parse_json(body, ResponsesRequest, engine, status_400=True)
    require_model(engine, "image2text", params.model)
    try:
        chat = _as_chat(params, engine)
        [handle] = await submit_chat(request, engine, chat)  # this API has one choice
    except ServiceError as error:  # named as the chat API names it: rename to this API's fields
        error.message = params.rename(error.message)
        error.param = error.param and params.rename(error.param)
        raise
    reply = _Reply(handle, engine.settings.model_id, params, chat)
    if not params.stream:
        output = await handle.result(functools.partial(wait_for_disconnect, request))
        return Response(json_bytes(reply.response(output)), media_type="application/json")
    events = reply.events(engine.settings.stream_keepalive_s)
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


def _as_chat(params: ResponsesRequest, engine: Engine) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(
            params.as_chat(), context={"settings": engine.settings}
        )
    except ValidationError as error:
        message, param = describe_validation_errors(list(error.errors()))
        raise BadRequest(message, param=param) from None


class _Reply:
    """Renders one job as OpenAI's `response` object, or as the events of its stream."""

    def __init__(
        self,
        handle: JobHandle,
        model_id: str,
        params: ResponsesRequest,
        chat: ChatCompletionRequest,
    ) -> None:
        self.handle = handle
        self.id = f"resp_{handle.request_id}"
        self.item_id = f"msg_{handle.request_id}"
        self.created = int(time.time())
        self.model_id = model_id
        self.params = params
        self.chat = chat
        self.sequence = 0

    def response(
        self,
        output: Image2TextOutput | None = None,
        status: str | None = None,
        answer: tuple[str | None, list[ToolCall]] | None = None,
    ) -> dict[str, Any]:
        """The `response` object: in progress (no output yet), or finished with `output`, its
        text and calls read once (`answer`, else read here)."""
        params = self.params
        incomplete = output is not None and output.finish_reason == "length"
        if status is None:
            status = "incomplete" if incomplete else "completed"
        items: list[dict[str, Any]] = []
        if output is not None:
            content, calls = answer or answer_calls(self.chat, output)
            if content or not calls:
                items.append(self.message(content or "", status))
            items += [self.function_call(call) for call in calls]
        choice = params.tool_choice
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": params.instructions,
            "max_output_tokens": params.max_output_tokens,
            "model": self.model_id,
            "output": items,
            "parallel_tool_calls": params.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": params.temperature or 0.0,  # greedy by default, as the chat API
            "text": {"format": params.text_format.model_dump(by_alias=True, exclude_none=True)},
            "tool_choice": choice.model_dump()
            if isinstance(choice, BaseModel)
            else choice or "auto",
            "tools": [tool.model_dump(exclude_none=True) for tool in params.tools or []],
            "top_p": params.top_p,
            "truncation": "disabled",
            "usage": None,
            "metadata": (params.model_extra or {}).get("metadata") or {},  # echoed, as OpenAI's
        }
        if output is not None:  # the chat API's counts, under this API's names
            counts = usage(output)
            body["usage"] = {
                "input_tokens": counts["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": counts["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": counts["total_tokens"],
            }
        return body

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [self.part(text)]
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    @staticmethod
    def function_call(call: ToolCall, arguments: str | None = None) -> dict[str, Any]:
        """A `function_call` item: done, or in progress with `arguments` so far."""
        return {
            "id": "fc_" + call.id.removeprefix("call_"),
            "type": "function_call",
            "status": "completed" if arguments is None else "in_progress",
            "call_id": call.id,
            "name": call.name,
            "arguments": call.arguments if arguments is None else arguments,
        }

    @staticmethod
    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def event(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"

    def message_opens(self) -> Iterator[str]:
        item = self.message(None, "in_progress")
        yield self.event("response.output_item.added", output_index=0, item=item)
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        yield self.event("response.content_part.added", **where, part=self.part(""))

    def message_closes(self, text: str, status: str) -> Iterator[str]:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        yield self.event("response.output_text.done", **where, text=text, logprobs=[])
        yield self.event("response.content_part.done", **where, part=self.part(text))
        item = self.message(text, status)
        yield self.event("response.output_item.done", output_index=0, item=item)

    def call_events(self, call: ToolCall, index: int) -> Iterator[str]:
        """A call's events, its arguments in one delta: it is read once the answer is whole."""
        where = {"item_id": "fc_" + call.id.removeprefix("call_"), "output_index": index}
        added = self.function_call(call, arguments="")
        yield self.event("response.output_item.added", output_index=index, item=added)
        yield self.event("response.function_call_arguments.delta", **where, delta=call.arguments)
        yield self.event("response.function_call_arguments.done", **where, arguments=call.arguments)
        yield self.event(
            "response.output_item.done", output_index=index, item=self.function_call(call)
        )

    async def events(self, heartbeat_s: float) -> AsyncIterator[str | bytes]:
        """The stream, event by event as OpenAI sends an answer's; dropping it cancels the
        job, like any client that leaves. Where tools are offered, the message opens with
        its first text, so an answer of calls alone has none."""
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        sent: list[str] = []  # the text streamed so far
        held = CallHoldback() if self.chat.functions else None
        try:
            yield self.event("response.created", response=self.response(status="in_progress"))
            yield self.event("response.in_progress", response=self.response(status="in_progress"))
            opened = held is None
            if opened:
                for line in self.message_opens():
                    yield line
            async for _number, event in self.handle.events(0, heartbeat_s):
                if isinstance(event, Heartbeat):
                    yield KEEPALIVE
                elif isinstance(event, Token) and event.text:
                    text = held.feed(event.text) if held else event.text
                    if not text:
                        continue
                    if not opened:
                        opened = True
                        for line in self.message_opens():
                            yield line
                    sent.append(text)
                    yield self.event("response.output_text.delta", **where, delta=text, logprobs=[])
                elif isinstance(event, Succeeded):
                    output = event.output
                    answer = answer_calls(self.chat, output)
                    content, calls = answer
                    final = self.response(output, answer=answer)
                    status = final["status"]
                    tail = held.finish(calls) if held else ""
                    if content or not calls:
                        if not opened:
                            for line in self.message_opens():
                                yield line
                        if tail:
                            sent.append(tail)
                            yield self.event(
                                "response.output_text.delta", **where, delta=tail, logprobs=[]
                            )
                        for line in self.message_closes(content or "", status):
                            yield line
                    first = 1 if content or not calls else 0
                    for index, call in enumerate(calls, start=first):
                        for line in self.call_events(call, index):
                            yield line
                    yield self.event(f"response.{status}", response=final)
                elif isinstance(event, Failed):  # a deadline, a cancel, an out-of-memory
                    error = error_body(event.error, self.handle.request_id)["error"]
                    failed = self.response(status="failed")
                    failed["error"] = {"code": error["code"], "message": error["message"]}
                    # What was streamed: the message, if it had opened; a call held back
                    # until its answer was whole was never sent.
                    message = self.message("".join(sent), "incomplete")
                    failed["output"] = [message] if opened else []
                    yield self.event("response.failed", response=failed)
        finally:
            self.handle.cancel(StopReason.CLIENT_GONE)

"""Request bodies of the OpenAI-compatible endpoints, with clear refusals of what is unsupported."""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hunyuan_service.api.schemas import (
    MAX_LIST_ITEMS,
    OBJECT_BRANCH,
    TEXT_BRANCH,
    ImageFormat,
    LoraChoice,
    ResponseFormat,
    check_loras,
    check_no_special_tokens,
    check_pixels,
    check_side,
    check_steps,
    check_temperature,
    item_pixels,
    refuse_huge_objects,
    video_sampling,
)
from hunyuan_service.api.tool_calls import (
    MAX_PARALLEL_CALLS,
    Function,
    call_text,
    json_object,
    response_text,
    tools_prompt,
)
from hunyuan_service.models.types import PixelRange
from hunyuan_service.settings import Settings
from hunyuan_service.videos import VideoSampling

Media = tuple[str, str, PixelRange]  # a part's URL, where it came from, and its resize bounds

MAX_CHOICES = 8  # `n`: each choice is a job of its own, with a queue place of its own
# Accepted and ignored: they do not change what this server produces.
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "quality", "style"}
# Values of refused fields that ask for nothing the service lacks: FLUX's images are opaque; an
# input is never cut to fit.
IMAGES_MAKE = {"background": ("auto", "opaque")}
RESPONSES_MAKE = {"truncation": ("disabled",)}


def _settings(info: ValidationInfo) -> Settings:
    return (info.context or {})["settings"]


def _refuse_extras(
    model: BaseModel,
    explain: dict[str, str],
    made: dict[str, tuple[Any, ...]],
    ignored: set[str] = IGNORED_FIELDS,
) -> None:
    for name, value in (model.model_extra or {}).items():
        if name in ignored:
            continue
        if name in explain:
            if value in (None, False, 0, [], {}, "text", {"type": "text"}, ["text"]):
                continue  # the default value asks for nothing unsupported
            if value in made.get(name, ()):
                continue
            raise ValueError(f"{name}: {explain[name]}")
        raise ValueError(f"{name}: unknown field")


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: ImageURL | None = None  # vLLM's part for a video: {"url": ...}
    # This image's or video's own resize bounds, as qwen-vl-utils' message items carry them
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _has_its_content(self) -> ContentPart:
        """A part carries the field its type names: `{"type": "image_url"}` alone is an
        error, not a part to drop."""
        if getattr(self, self.type) is None:
            raise ValueError(f'a part of type "{self.type}" needs its "{self.type}" field')
        return self


def _text_or_parts(value: Any) -> str:
    return TEXT_BRANCH if isinstance(value, str) else OBJECT_BRANCH


Part = TypeVar("Part", bound=BaseModel)
# A string, or a list of parts: validated as the one the JSON value is, so that a bad part
# reports its own problem (`messages[0].content[1]: ...`), not one for each form it is not.
TextOrParts = Annotated[
    Annotated[str, Tag(TEXT_BRANCH)]
    | Annotated[list[Part], Field(max_length=64), Tag(OBJECT_BRANCH)],
    Discriminator(_text_or_parts),
]
MessageContent = TextOrParts[ContentPart]


class FunctionCallIn(BaseModel):
    name: str
    arguments: str  # JSON text of an object, as the model's answer gave it

    @field_validator("arguments")
    @classmethod
    def _an_object(cls, value: str) -> str:
        if json_object(value) is None:
            raise ValueError("must be the JSON text of an object, as the answer gave it")
        return value


class ToolCallIn(BaseModel):
    """A call in an earlier assistant message, sent back as the conversation."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn

    def text(self) -> str:
        return call_text(self.function.name, json_object(self.function.arguments) or {})


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: MessageContent | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=MAX_PARALLEL_CALLS * 4)
    tool_call_id: str | None = None  # a tool's result: which call it answers

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, value: str) -> str:
        # OpenAI's newer name for the system message, which its SDK and agent frameworks send;
        # Qwen's chat template knows only "system".
        return "system" if value == "developer" else value

    @model_validator(mode="after")
    def _tool_parts(self) -> ChatMessageIn:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message carries tool calls")
        if self.role == "tool":
            if self.content is None:
                raise ValueError("content: a tool message carries the tool's result")
            if not isinstance(self.content, str) and any(
                part.type != "text" for part in self.content
            ):
                raise ValueError(
                    "content: a tool message carries text; send images in a user message"
                )
        return self


Named = TypeVar("Named", bound=BaseModel)
# `tool_choice`: "none", "auto" or "required", or the API's object naming one function.
ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag(TEXT_BRANCH)]
    | Annotated[Named, Tag(OBJECT_BRANCH)],
    Discriminator(_text_or_parts),
]


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object
    strict: bool | None = None  # the schema is enforced where calls are required, strict or not

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type", "object") != "object":
            raise ValueError('must be the JSON schema of an object ("type": "object")')
        return value


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """`{"type": "function", "function": {"name"}}`: the answer is a call of that function."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


class StreamOptions(BaseModel):
    include_usage: bool = False


CHAT_UNSUPPORTED = {
    "functions": "the legacy functions field is not supported; send tools",
    "function_call": "the legacy function_call field is not supported; send tool_choice",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "logit_bias": "logit_bias is not supported",
    "modalities": "only text output is supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "frequency_penalty": "only 0 is supported",
    "presence_penalty": "only 0 is supported",
    "reasoning_effort": "not supported",
}


class PixelBounds(BaseModel):
    """`{"min_pixels", "max_pixels", "fps", "max_frames"}`: how far each image (and video
    frame) of the request is resized, and how its videos are sampled."""

    model_config = ConfigDict(extra="forbid")

    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    fps: float = Field(2.0, gt=0, le=30)
    max_frames: int = Field(32, ge=2, le=768)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    _bounded = model_validator(mode="before")(refuse_huge_objects)

    model: str
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_LIST_ITEMS)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    mm_processor_kwargs: PixelBounds | None = None  # vLLM's name for per-request resizing
    tools: list[ChatTool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice[NamedToolChoice] | None = None
    parallel_tool_calls: bool | None = None

    @functools.cached_property
    def functions(self) -> list[Function]:
        """The functions the model is told of: none with `tool_choice` "none"."""
        if self.tool_choice == "none":
            return []
        return [
            Function(tool.function.name, tool.function.description, tool.function.parameters)
            for tool in self.tools or []
        ]

    @property
    def forced_calls(self) -> list[Function]:
        """The functions an answer must call ("required": any; named: that one), else []."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return [f for f in self.functions if f.name == choice.function.name]
        return self.functions if choice == "required" else []

    @functools.cached_property
    def tools_prompt(self) -> str | None:
        """What the system message gains (computed once: validation reads it, and so does the
        route, on the event loop, where a large body's validation was on the CPU pool)."""
        functions = self.functions
        return tools_prompt(functions) if functions else None

    def pixel_bounds(self) -> dict[str, int | None]:
        bounds = self.mm_processor_kwargs or PixelBounds()
        return {"min_pixels": bounds.min_pixels, "max_pixels": bounds.max_pixels}

    def _pixels(self, part: ContentPart) -> PixelRange:
        """A part's resize bounds: its own where it sets them, else the request's."""
        bounds = self.mm_processor_kwargs or PixelBounds()
        return item_pixels(part, bounds.min_pixels, bounds.max_pixels)

    @field_validator("n")
    @classmethod
    def _choices(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= MAX_CHOICES:
            raise ValueError(f"must be from 1 to {MAX_CHOICES} (got {value})")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed (got {len(stops)})")
        if not all(stops):
            raise ValueError("an empty stop sequence would end every answer at once; remove it")
        return stops

    @model_validator(mode="after")
    def _tools(self) -> ChatCompletionRequest:
        names = [tool.function.name for tool in self.tools or []]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"tools: each function needs its own name; {twice[0]!r} is twice")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(
                f"tool_choice: names {choice.function.name!r}, which is not among tools"
            )
        if choice == "required" and not names:
            raise ValueError('tool_choice: "required" needs tools to call')
        if self.forced_calls and self.response_format and self.response_format.constrains:
            raise ValueError(
                "response_format: an answer that must call a tool can't also follow "
                'response_format; send one of them, or tool_choice "auto"'
            )
        return self

    @model_validator(mode="after")
    def _limits(self, info: ValidationInfo) -> ChatCompletionRequest:
        _refuse_extras(self, CHAT_UNSUPPORTED, {})
        settings = _settings(info)
        if self.mm_processor_kwargs is not None:
            bounds = self.mm_processor_kwargs
            check_pixels(bounds.min_pixels, bounds.max_pixels, settings, "mm_processor_kwargs.")
        for i, message in enumerate(self.messages):
            parts = [] if isinstance(message.content, str) else message.content or []
            for j, part in enumerate(parts):
                where = f"messages[{i}].content[{j}]."
                if part.type == "text" and (part.min_pixels or part.max_pixels):
                    raise ValueError(f"{where}min_pixels: only image and video parts are resized")
                check_pixels(part.min_pixels, part.max_pixels, settings, where)
        if (self.n or 1) > settings.max_queue_size:
            raise ValueError(
                f"n: at most {settings.max_queue_size} here: each choice is a job that takes a "
                "queue place (MAX_QUEUE_SIZE)"
            )
        limit = settings.max_new_tokens_limit
        if (self.max_completion_tokens or self.max_tokens or 0) > limit:
            raise ValueError(f"max_tokens: must be at most {limit}")
        texts, _, _ = self.texts_and_images
        for index, text in enumerate(texts):
            try:
                check_no_special_tokens(text)
            except ValueError as error:
                raise ValueError(f"messages: message {index} {error}") from None
        prompt = self.tools_prompt or ""
        try:
            check_no_special_tokens(prompt)
        except ValueError as error:
            raise ValueError(f"tools: the functions' text {error}") from None
        if self.temperature is not None:
            try:
                check_temperature(self.temperature)
            except ValueError as error:
                raise ValueError(f"temperature: {error}") from None
        chars = sum(len(text) for text in texts) + len(prompt)
        if chars > settings.max_prompt_chars:
            raise ValueError(
                f"messages: the text of all messages (and of tools) is {chars} characters; at "
                f"most {settings.max_prompt_chars} are allowed"
            )
        return self

    @functools.cached_property
    def texts_and_images(self) -> tuple[list[str], list[list[Media]], list[list[Media]]]:
        """Per message: its text parts joined, and its image and video URLs, each with where
        it came from and its resize bounds (computed once, as `tools_prompt`)."""
        texts: list[str] = []
        media: dict[str, list[list[Media]]] = {"image_url": [], "video_url": []}
        for i, message in enumerate(self.messages):
            parts = [] if isinstance(message.content, str) else message.content or []
            if isinstance(message.content, str):
                text = message.content
            else:
                text = "\n".join(part.text or "" for part in parts if part.type == "text")
            if message.role == "tool":
                text = response_text(text)
            elif message.tool_calls:
                text = "\n".join([text] * bool(text) + [call.text() for call in message.tool_calls])
            texts.append(text)
            for kind, found in media.items():
                found.append(
                    [
                        (url.url, f"messages[{i}].content[{j}].{kind}", self._pixels(part))
                        for j, part in enumerate(parts)
                        if part.type == kind and (url := getattr(part, kind)) is not None
                    ]
                )
        return texts, media["image_url"], media["video_url"]

    def video_sampling(self, pixels: PixelRange, settings: Settings) -> VideoSampling:
        """How a video with these resize bounds is sampled."""
        bounds = self.mm_processor_kwargs or PixelBounds()
        return video_sampling(bounds.fps, bounds.max_frames, *pixels, settings)

    def token_budget(self, settings: Settings) -> int:
        return (
            self.max_completion_tokens or self.max_tokens or min(512, settings.max_new_tokens_limit)
        )


IMAGES_UNSUPPORTED = {
    "response_format": "only b64_json is supported; this server keeps no image URLs",
    "background": "not supported",
    "moderation": "not supported",
    "output_compression": "not supported",
    "partial_images": "not supported",
    "stream": "image streaming is not supported here; use POST /infer with stream=true",
}


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    _bounded = model_validator(mode="before")(refuse_huge_objects)

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str = "1024x1024"
    output_format: ImageFormat = "png"
    seed: int | None = Field(None, ge=0, lt=2**63)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    loras: list[LoraChoice] = Field(default_factory=list, max_length=MAX_LIST_ITEMS)

    @model_validator(mode="before")
    @classmethod
    def _b64_json_is_the_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("response_format") in (None, "b64_json"):
            data = {k: v for k, v in data.items() if k != "response_format"}
        return data

    @field_validator("size", mode="before")
    @classmethod
    def _auto_is_the_default(cls, value: Any) -> Any:
        # OpenAI's "auto" (the SDK's default for its newer image models): the size this server
        # picks without one, 1024x1024 for a generation and the image's own for an edit.
        return cls.model_fields["size"].default if value == "auto" else value

    @model_validator(mode="after")
    def _limits(self, info: ValidationInfo) -> ImageGenerationRequest:
        _refuse_extras(self, IMAGES_UNSUPPORTED, IMAGES_MAKE)
        settings = _settings(info)
        if len(self.prompt) > settings.max_prompt_chars:
            raise ValueError(f"prompt: at most {settings.max_prompt_chars} characters")
        if self.n > settings.max_images_per_request:
            raise ValueError(f"n: at most {settings.max_images_per_request} images per request")
        try:
            check_loras(self.loras, settings)
        except ValueError as error:
            raise ValueError(f"loras: {error}") from None
        try:
            check_steps(self.num_inference_steps, settings)
        except ValueError as error:
            raise ValueError(f"num_inference_steps: {error}") from None
        if self.size is None:
            return self
        match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", self.size)
        if match is None:
            raise ValueError(f"size: must look like '1024x768', or be 'auto' (got {self.size!r})")
        for value in match.groups():
            try:
                check_side(int(value), settings)
            except ValueError as error:
                raise ValueError(f"size: each side {error}") from None
        return self

    @property
    def dimensions(self) -> tuple[int, int] | None:
        """(width, height) of `size`; None where it was left out (an edit's default)."""
        if self.size is None:
            return None
        width, height = self.size.split("x")
        return int(width), int(height)


class ImageEditRequest(ImageGenerationRequest):
    """OpenAI's `images.edit` form: the image and mask arrive as files beside these fields.

    Without `size` the output takes the image's size (see /infer's `image`). `strength` is
    this server's own: how far the result may move from the image."""

    size: str | None = None  # type: ignore[assignment]
    strength: float | None = Field(None, gt=0, le=1)
    input_fidelity: str | None = None  # gpt-image-1's; FLUX has no such setting


# -- the Responses API (image2text) ----------------------------------------------------------

RESPONSES_UNSUPPORTED = {
    "previous_response_id": "this server keeps no responses; send the whole conversation in "
    "input (the SDK: input += response.output)",
    "conversation": "this server keeps no conversations; send the whole conversation in input",
    "max_tool_calls": "not supported; parallel_tool_calls: false makes one call at most",
    "top_logprobs": "logprobs are not supported",
    "include": "not supported",
    "reasoning": "not supported",
    "background": "not supported; POST /v1/jobs runs jobs that outlive their connection",
    "prompt": "prompt templates are not supported",
    "truncation": "only disabled is supported: an input too long for the model is refused",
}
# Accepted and ignored on /v1/responses: nothing is stored, and these change no answer.
RESPONSES_IGNORED = IGNORED_FIELDS | {
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "stream_options",
}


class InputPart(BaseModel):
    """A part of a Responses message: `input_text`, `input_image`, or the `output_text` of an
    earlier answer sent back as conversation."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["input_text", "input_image", "output_text"]
    text: str | None = None
    image_url: str | None = None
    detail: str | None = None
    file_id: str | None = None
    annotations: list[Any] | None = Field(None, max_length=0)  # an earlier answer's: none here
    logprobs: list[Any] | None = Field(None, max_length=0)
    parsed: Any = None  # the SDK's parse helpers add it to an answer they send back
    # This image's own resize bounds, as on a chat part
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _has_its_content(self) -> InputPart:
        if self.type != "input_image":
            if self.text is None:
                raise ValueError(f'a part of type "{self.type}" needs its "text"')
        elif self.file_id is not None:
            raise ValueError(
                "file_id: uploaded files are not kept here; send the image in image_url, as a "
                "data URI or an allowed URL"
            )
        elif self.image_url is None:
            raise ValueError('a part of type "input_image" needs its "image_url"')
        return self

    def as_chat(self) -> dict[str, Any]:
        """The chat part this part is."""
        if self.type != "input_image":
            return {"type": "text", "text": self.text}
        image: dict[str, Any] = {"url": self.image_url, "detail": self.detail}
        return {
            "type": "image_url",
            "image_url": image,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
        }


class InputMessage(BaseModel):
    """A message of `input`: the SDK's easy form `{"role", "content"}`, or a message item (an
    earlier answer's, sent back, carries its `id` and `status`)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: TextOrParts[InputPart]
    id: str | None = None
    status: str | None = None
    phase: str | None = None


def _drop_nulls(data: Any) -> Any:
    """A `mode="before"` check: a null asks for nothing, so such a field is left out rather
    than refused (the SDK's `model_dump()` of an output item writes its newer fields,
    `namespace` and the like, as nulls)."""
    if isinstance(data, dict):
        return {key: value for key, value in data.items() if value is not None}
    return data


class FunctionCallItem(BaseModel):
    """A call an earlier answer made, sent back as conversation."""

    model_config = ConfigDict(extra="forbid")

    _nulls = model_validator(mode="before")(_drop_nulls)

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None

    def as_chat(self) -> dict[str, Any]:
        """The chat API's `tool_calls` entry this is."""
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.call_id, "type": "function", "function": function}


class OutputText(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["input_text", "output_text"]
    text: str


class FunctionCallOutputItem(BaseModel):
    """A tool's result for the call `call_id`: text, or text parts."""

    model_config = ConfigDict(extra="forbid")

    _nulls = model_validator(mode="before")(_drop_nulls)

    type: Literal["function_call_output"]
    call_id: str
    output: TextOrParts[OutputText]
    id: str | None = None
    status: str | None = None

    @field_validator("output", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list) and any(
            isinstance(part, dict) and part.get("type") not in ("input_text", "output_text")
            for part in value
        ):
            raise ValueError(
                "a tool's result is text here (input_text parts); send images in a user message"
            )
        return value

    def as_chat(self) -> dict[str, Any]:
        output = self.output
        text = output if isinstance(output, str) else "\n".join(part.text for part in output)
        return {"role": "tool", "tool_call_id": self.call_id, "content": text}


def _item_type(value: Any) -> str:
    """The branch of an input item: its `type` in angle brackets (`field_path` leaves such
    names out of an error's location); an item without one is a message."""
    found = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "")
    return f"<{found}>" if isinstance(found, str) else ""


InputItem = Annotated[
    Annotated[InputMessage, Tag("<message>")]
    | Annotated[FunctionCallItem, Tag("<function_call>")]
    | Annotated[FunctionCallOutputItem, Tag("<function_call_output>")],
    Discriminator(
        _item_type,
        custom_error_type="invalid_item",
        custom_error_message="an input item is a message, a function_call or a "
        "function_call_output",
    ),
]


class ResponsesFunction(BaseModel):
    """A function tool in this API's flat shape: `{"type": "function", "name", "description",
    "parameters", "strict"}` (the chat API nests the same under `function`)."""

    model_config = ConfigDict(extra="forbid")

    _nulls = model_validator(mode="before")(_drop_nulls)

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def as_chat(self) -> dict[str, Any]:
        function = self.model_dump(exclude={"type"}, exclude_none=True)
        return {"type": "function", "function": function}


class ResponsesNamedChoice(BaseModel):
    """`{"type": "function", "name"}`: the answer is a call of that function."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """`text.format`: `{"type": "text"}`, `{"type": "json_object"}`, or `{"type":
    "json_schema", "name", "schema", "strict"}` (the chat API's json_schema, flattened)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    def as_chat(self) -> dict[str, Any]:
        """The chat API's `response_format` this is."""
        if self.type != "json_schema":
            return {"type": self.type}
        fields = {"name": self.name, "schema": self.schema_, "description": self.description}
        given = {key: value for key, value in fields.items() if value is not None}
        return {"type": "json_schema", "json_schema": {**given, "strict": self.strict}}


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the default; other levels are not supported


class ResponsesRequest(BaseModel):
    """OpenAI's `responses.create` body, as far as an image2text model answers it. It becomes
    a chat (`as_chat`): `instructions` the system message, then the messages of `input`."""

    model_config = ConfigDict(extra="allow")

    _bounded = model_validator(mode="before")(refuse_huge_objects)

    model: str
    input: Annotated[
        Annotated[str, Tag(TEXT_BRANCH)]
        | Annotated[
            list[InputItem], Field(min_length=1, max_length=MAX_LIST_ITEMS), Tag(OBJECT_BRANCH)
        ],
        Discriminator(_text_or_parts),
    ]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)  # an extension, as on the chat API
    text: TextConfig | None = None
    stream: bool = False
    mm_processor_kwargs: PixelBounds | None = None
    tools: list[ResponsesFunction] | None = Field(None, max_length=128)
    tool_choice: ToolChoice[ResponsesNamedChoice] | None = None
    parallel_tool_calls: bool | None = None
    # Where each chat message came from (`as_chat` fills these): the index in `input` of its
    # first item, and of each of its tool calls.
    _origins: list[int] = PrivateAttr(default_factory=list)
    _call_origins: dict[tuple[int, int], int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _refusals(self) -> ResponsesRequest:
        _refuse_extras(self, RESPONSES_UNSUPPORTED, RESPONSES_MAKE, RESPONSES_IGNORED)
        return self

    @property
    def text_format(self) -> TextFormat:
        return (self.text and self.text.format) or TextFormat(type="text")

    def as_chat(self) -> dict[str, Any]:
        """The chat request this is, for `ChatCompletionRequest` to validate: its limits,
        images, grammar and tool calling are the chat API's. A run of `function_call` items
        joins the assistant message before it (one turn with its calls, as Qwen writes them);
        a `function_call_output` is a tool message."""
        messages: list[dict[str, Any]] = []
        origins: list[int] = []
        self._call_origins = {}
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
            origins.append(-1)
        items = (
            self.input
            if isinstance(self.input, list)
            else [InputMessage(role="user", content=self.input)]
        )
        for index, item in enumerate(items):
            if isinstance(item, FunctionCallItem):
                if not messages or messages[-1]["role"] != "assistant":
                    messages.append({"role": "assistant", "content": None})
                    origins.append(index)
                calls = messages[-1].setdefault("tool_calls", [])
                self._call_origins[len(messages) - 1, len(calls)] = index
                calls.append(item.as_chat())
                continue
            if isinstance(item, FunctionCallOutputItem):
                messages.append(item.as_chat())
            else:
                content = item.content
                parts = content if isinstance(content, str) else [p.as_chat() for p in content]
                messages.append({"role": item.role, "content": parts})
            origins.append(index)
        self._origins = origins
        chat: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stream": self.stream,
            "response_format": self.text_format.as_chat(),
            "tools": [tool.as_chat() for tool in self.tools] if self.tools else None,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        choice = self.tool_choice
        if isinstance(choice, ResponsesNamedChoice):
            chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            chat["tool_choice"] = choice
        if self.mm_processor_kwargs is not None:
            chat["mm_processor_kwargs"] = self.mm_processor_kwargs.model_dump()
        return chat

    def rename(self, text: str) -> str:
        """`text` (an error's message or param) with the chat API's field names made this
        request's: `messages[2]` is the input item it came from (`instructions` for the
        system message made of them), `max_tokens` is `max_output_tokens`, `response_format` is
        `text.format`, and a tool's `function.parameters` its `parameters`."""

        def item(index: int) -> str:
            origin = self._origins[index] if index < len(self._origins) else index
            if origin < 0:
                return "instructions"
            return f"input[{origin}]" if isinstance(self.input, list) else "input"

        def call(found: re.Match[str]) -> str:
            origin = self._call_origins.get((int(found[1]), int(found[2])))
            return f"input[{origin}]" if origin is not None else found[0]

        text = re.sub(r"\bmessages\[(\d+)\]\.tool_calls\[(\d+)\](\.function)?", call, text)
        text = re.sub(r"\bmessages: message (\d+) ", lambda m: f"{item(int(m[1]))}: ", text)
        text = re.sub(r"\bmessages\[(\d+)\]", lambda m: item(int(m[1])), text)
        text = re.sub(r"\bmessages\b", "input", text)
        text = re.sub(r"\bmax_(completion_)?tokens\b", "max_output_tokens", text)
        text = re.sub(r"\b(tools\[\d+\])\.function\b", r"\1", text)
        return re.sub(r"\bresponse_format(\.json_schema)?", "text.format", text)

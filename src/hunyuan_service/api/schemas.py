"""Request and response bodies of /infer and /v1/jobs, validated against the operator's limits."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hunyuan_service.media import ImageSource
from hunyuan_service.models.types import PixelRange
from hunyuan_service.settings import Settings
from hunyuan_service.videos import VideoSampling

ImageFormat = Literal["png", "jpeg", "webp"]


def _limits(info: ValidationInfo) -> Settings:
    settings = (info.context or {}).get("settings")
    if settings is None:
        raise RuntimeError("validate requests with context={'settings': settings}")
    return settings


# Hard caps checked before any field is validated, so the work and the error message of a
# bad body stay small however large the body is (the settings' own limits are lower still).
MAX_BODY_FIELDS = 64
MAX_LIST_ITEMS = 256


def refuse_huge_objects(data: Any) -> Any:
    """A `mode="before"` check: a body with far more fields than any request has is one error,
    not one error per field."""
    if isinstance(data, dict) and len(data) > MAX_BODY_FIELDS:
        raise ValueError(f"body: has {len(data)} fields; a request has at most {MAX_BODY_FIELDS}")
    return data


class RequestBase(BaseModel):
    """Fields every /infer request shares. Unknown fields are refused, so a typo never passes."""

    model_config = ConfigDict(extra="forbid")

    _bounded = model_validator(mode="before")(refuse_huge_objects)

    prompt: str = Field(min_length=1)
    stream: bool = False
    timeout_s: float | None = Field(
        None, gt=0, description="A shorter deadline than REQUEST_TIMEOUT_S; never a longer one."
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_length(cls, value: str, info: ValidationInfo) -> str:
        limit = _limits(info).max_prompt_chars
        if not value.strip():
            raise ValueError("must not be blank")
        if len(value) > limit:
            raise ValueError(f"is {len(value)} characters; at most {limit} are allowed")
        return value

    @field_validator("timeout_s")
    @classmethod
    def _timeout_within_limit(cls, value: float | None, info: ValidationInfo) -> float | None:
        limit = _limits(info).request_timeout_s
        if value is not None and value > limit:
            raise ValueError(f"is {value:g} s; at most REQUEST_TIMEOUT_S ({limit:g} s) is allowed")
        return value


class LoraChoice(BaseModel):
    """One LoRA adapter for a text2image request: a name the operator configured, and a scale."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    scale: float = Field(1.0, ge=-4, le=4)


def check_loras(value: list[LoraChoice], settings: Settings) -> list[LoraChoice]:
    """At most MAX_LORAS_PER_REQUEST adapters, each named once, each one the operator set up."""
    known = settings.lora_names
    if value and not known:
        raise ValueError("no LoRA adapters are configured on this server (LORA_DIR, LORAS)")
    if len(value) > settings.max_loras_per_request:
        raise ValueError(
            f"{len(value)} adapters; at most {settings.max_loras_per_request} are allowed "
            "(MAX_LORAS_PER_REQUEST)"
        )
    names = [choice.name for choice in value]
    if len(set(names)) < len(names):
        raise ValueError("each adapter may be named once")
    unknown = [name for name in names if name not in known]
    if unknown:
        listed = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
        raise ValueError(f"unknown adapter {unknown[0][:64]!r}; the adapters here are: {listed}")
    return value


class Text2ImageRequest(RequestBase):
    width: int = 1024
    height: int = 1024
    n: int = Field(
        1,
        ge=1,
        description="Images to make, up to MAX_IMAGES_PER_REQUEST; image i uses seed + i.",
    )
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    seed: int | None = Field(None, ge=0, lt=2**63)
    output_format: ImageFormat = "png"
    loras: list[LoraChoice] = Field(default_factory=list, max_length=MAX_LIST_ITEMS)
    image: str | None = Field(
        None,
        description="An image to start from (base64, a data URI, or a URL or path the operator "
        "allows): image-to-image, or inpainting with `mask`. Without width and height the "
        "output takes its size, rounded down to multiples of 16.",
    )
    mask: str | None = Field(
        None,
        description="Inpainting: an image of `image`'s size whose white parts are repainted "
        "(or, with transparency, whose transparent parts are); the rest comes back as sent.",
    )
    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        description="With `image`: how far the result may move from it, the share of the steps "
        "that run; 0.6 by default, 1.0 with a mask.",
    )

    @field_validator("loras")
    @classmethod
    def _loras(cls, value: list[LoraChoice], info: ValidationInfo) -> list[LoraChoice]:
        return check_loras(value, _limits(info))

    @model_validator(mode="after")
    def _edit_fields(self) -> Text2ImageRequest:
        check_edit_fields(self.image is not None, self.mask is not None, self.strength)
        sides = {"width", "height"} & self.model_fields_set
        if self.image is not None and len(sides) == 1:
            # The other side's default (1024) would stretch the image; its own size is meant.
            (missing,) = {"width", "height"} - sides
            raise ValueError(
                f"{missing}: an edit's output has the image's size, or the width and height "
                f"sent; send {missing} too, or neither"
            )
        return self

    @field_validator("width", "height")
    @classmethod
    def _side(cls, value: int, info: ValidationInfo) -> int:
        return check_side(value, _limits(info))

    @field_validator("n")
    @classmethod
    def _count(cls, value: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_images_per_request
        if value > limit:
            raise ValueError(
                f"is {value}; at most {limit} images per request (MAX_IMAGES_PER_REQUEST)"
            )
        return value

    @field_validator("num_inference_steps")
    @classmethod
    def _steps(cls, value: int | None, info: ValidationInfo) -> int | None:
        return check_steps(value, _limits(info))


def check_side(value: int, settings: Settings) -> int:
    """The size rule of text2image: a multiple of 16 within the operator's bounds."""
    low, high = settings.min_image_side, settings.max_image_side
    if value % 16:
        raise ValueError(f"must be a multiple of 16 (got {value})")
    if not low <= value <= high:
        raise ValueError(f"must be between {low} and {high} (got {value})")
    return value


def check_edit_fields(image: bool, mask: bool, strength: float | None) -> None:
    """`mask` and `strength` belong to an edit: they need an image to work on."""
    if mask and not image:
        raise ValueError("mask: needs an image to paint into; send image as well")
    if strength is not None and not image:
        raise ValueError("strength: applies to an image edit; send image, or leave strength out")


def check_steps(value: int | None, settings: Settings) -> int | None:
    limit = settings.max_inference_steps
    if value is not None and value > limit:
        raise ValueError(f"must be at most {limit} (got {value})")
    return value


class JSONSchemaFormat(BaseModel):
    """OpenAI's `json_schema` object: the schema the answer must follow."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = Field(None, max_length=2048)
    strict: bool | None = None  # the schema is always enforced, strict or not


class ResponseFormat(BaseModel):
    """`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema"}`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a "json_schema" object with a "schema"')
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f'"json_schema" goes with type "json_schema", not {self.type!r}')
        return self

    @property
    def constrains(self) -> bool:
        return self.type != "text"


class OwnPixels(BaseModel):
    """An image's or video's own resize bounds, in place of the request's (each one that is
    set); the shape of qwen-vl-utils' message items."""

    model_config = ConfigDict(extra="forbid")

    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)


class ImageItem(OwnPixels):
    """`{"image": ..., "min_pixels", "max_pixels"}`: one image in the forms `images` takes."""

    image: str


class VideoItem(OwnPixels):
    """`{"video": ..., "min_pixels", "max_pixels"}`: one video in the forms `videos` takes."""

    video: str


# The branches of a text-or-object union, named in error locations only; `field_path` drops
# them, so a bad item reads `images[0].max_pixels`, not the name of a branch.
TEXT_BRANCH, OBJECT_BRANCH = "<text>", "<object>"


def _text_or_object(value: Any) -> str:
    return OBJECT_BRANCH if isinstance(value, (dict, BaseModel)) else TEXT_BRANCH


# A string, or an object with its own resize bounds: validated as the one the JSON value is, so
# a bad item reports its own problem, not one for each form it is not.
ImageValue = Annotated[
    Annotated[str, Tag(TEXT_BRANCH)] | Annotated[ImageItem, Tag(OBJECT_BRANCH)],
    Discriminator(_text_or_object),
]
VideoValue = Annotated[
    Annotated[str, Tag(TEXT_BRANCH)] | Annotated[VideoItem, Tag(OBJECT_BRANCH)],
    Discriminator(_text_or_object),
]


class Image2TextRequest(RequestBase):
    """The reference body `{"images": [...], "prompt"}` plus generation parameters."""

    images: list[ImageValue] = Field(
        default_factory=list,
        max_length=MAX_LIST_ITEMS,
        description="Images as base64, a data URI, or a URL or path the operator allows; an "
        'item may be {"image", "min_pixels", "max_pixels"} to size that image alone.',
    )
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, le=1000)
    repetition_penalty: float | None = Field(None, ge=0.1, le=10)
    seed: int | None = Field(None, ge=0, lt=2**63)
    response_format: ResponseFormat | None = None
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    videos: list[VideoValue] = Field(
        default_factory=list,
        max_length=MAX_LIST_ITEMS,
        description="Videos (MP4, WebM or animated GIF) as base64, a data URI, or a URL or path "
        'the operator allows; they follow the images in the turn. An item may be {"video", '
        '"min_pixels", "max_pixels"} to size that video\'s frames alone.',
    )
    fps: float = Field(2.0, gt=0, le=30, description="Video frames sampled per second.")
    max_frames: int = Field(
        32, ge=2, le=768, description="The most frames sampled from each video."
    )

    @model_validator(mode="after")
    def _pixels(self, info: ValidationInfo) -> Image2TextRequest:
        settings = _limits(info)
        check_pixels(self.min_pixels, self.max_pixels, settings, "")
        for field, items in (("images", self.images), ("videos", self.videos)):
            for i, item in enumerate(items):
                if isinstance(item, OwnPixels):
                    check_pixels(item.min_pixels, item.max_pixels, settings, f"{field}[{i}].")
        return self

    def image_sources(self) -> list[ImageSource]:
        """Each image to fetch and decode, with the bounds the model resizes it within."""
        return [
            ImageSource(_value(item, "image"), f"images[{i}]", pixels=self.pixels(item))
            for i, item in enumerate(self.images)
        ]

    def video_sources(self, settings: Settings) -> list[ImageSource]:
        """Each video to fetch and decode, with how it is sampled and its frames sized (while
        decoding, so the bounds travel in its sampling)."""
        return [
            ImageSource(
                _value(item, "video"),
                f"videos[{i}]",
                video=video_sampling(self.fps, self.max_frames, *self.pixels(item), settings),
            )
            for i, item in enumerate(self.videos)
        ]

    def pixels(self, item: str | OwnPixels | None = None) -> PixelRange:
        """An item's resize bounds: its own where it sets them, else the request's."""
        return item_pixels(item, self.min_pixels, self.max_pixels)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        return check_temperature(value)

    @field_validator("prompt")
    @classmethod
    def _no_special_tokens(cls, value: str) -> str:
        return check_no_special_tokens(value)

    @field_validator("max_new_tokens")
    @classmethod
    def _max_new_tokens(cls, value: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_new_tokens_limit
        if value > limit:
            raise ValueError(f"must be at most {limit} (got {value})")
        return value

    @field_validator("images")
    @classmethod
    def _image_count(cls, value: list[Any], info: ValidationInfo) -> list[Any]:
        limit = _limits(info).max_input_images
        if len(value) > limit:
            raise ValueError(f"{len(value)} images sent; at most {limit} are allowed")
        return value


def item_pixels(item: object, low: int | None, high: int | None) -> PixelRange:
    """An image's or video's resize bounds: its own `min_pixels` and `max_pixels` where it
    sets them (an `OwnPixels` item, a chat content part), else `low` and `high`."""
    return (getattr(item, "min_pixels", None) or low, getattr(item, "max_pixels", None) or high)


def _value(item: str | OwnPixels, kind: str) -> str:
    """The image or video itself: the string, or an item's `image` / `video`."""
    return str(getattr(item, kind)) if isinstance(item, OwnPixels) else item


def video_sampling(
    fps: float, max_frames: int, low: int | None, high: int | None, settings: Settings
) -> VideoSampling:
    """How a video is sampled, its frames sized within `low` and `high` pixels (by default
    Qwen's floor and VL_MAX_PIXELS; the share of MAX_VIDEO_TOKENS may lower them further)."""
    return VideoSampling(fps, max_frames, high or settings.vl_max_pixels, low or QWEN_MIN_PIXELS)


QWEN_MIN_PIXELS = 4 * 28 * 28  # an image is at least 4 of Qwen2.5-VL's 28-pixel patches


def check_pixels(low: int | None, high: int | None, settings: Settings, prefix: str) -> None:
    """Per-request resizing bounds must lie within the server's: at least Qwen's 4 patches
    (3136 pixels), at most VL_MAX_PIXELS, and min_pixels no more than max_pixels."""
    ceiling = settings.vl_max_pixels
    for name, value in (("min_pixels", low), ("max_pixels", high)):
        if value is not None and not QWEN_MIN_PIXELS <= value <= ceiling:
            raise ValueError(
                f"{prefix}{name}: must be between {QWEN_MIN_PIXELS} and {ceiling} (VL_MAX_PIXELS) "
                f"pixels (got {value})"
            )
    if low is not None and high is not None and low > high:
        raise ValueError(f"{prefix}min_pixels: {low} is more than max_pixels ({high})")


# Qwen's control tokens, e.g. <|im_start|> or <|image_pad|>. In user text they would be read as
# real markers: a new turn with any role (a forged system prompt), or an image slot with no image.
SPECIAL_TOKEN = re.compile(r"<\|[a-z_]+\|>")
MIN_TEMPERATURE = 0.01  # below this, logits / temperature overflows and sampling breaks


def check_no_special_tokens(text: str) -> str:
    found = SPECIAL_TOKEN.search(text)
    if found:
        raise ValueError(
            f"contains the model's control token {found.group()!r}; remove it (such tokens "
            "would be read as chat markers, not as text)"
        )
    return text


def check_temperature(value: float) -> float:
    if 0 < value < MIN_TEMPERATURE:
        raise ValueError(
            f"must be 0 (greedy) or at least {MIN_TEMPERATURE} (got {value:g}); a smaller one "
            "overflows the sampler"
        )
    return value


def check_webhook(value: str | None, settings: Settings) -> str | None:
    """A webhook URL must be http(s) on a host in ALLOWED_WEBHOOK_DOMAINS, with a secret set."""
    from urllib.parse import urlsplit

    from hunyuan_service.media import host_allowed

    if value is None:
        return None
    if settings.webhook_secret is None:
        raise ValueError("webhooks are disabled on this server (operators: set WEBHOOK_SECRET)")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError("is not a valid URL") from None
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host or port == 0:
        raise ValueError("must be an http(s) URL with a host")
    if not host_allowed(host, settings.allowed_webhook_domains):
        raise ValueError(f"host {host!r} is not in ALLOWED_WEBHOOK_DOMAINS")
    return value


class WebhookField(BaseModel):
    """`webhook`: a URL called once when a /v1/jobs job ends (jobs API only)."""

    webhook: str | None = Field(None, max_length=2048)

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, value: str | None, info: ValidationInfo) -> str | None:
        return check_webhook(value, _limits(info))


class Text2ImageJobRequest(Text2ImageRequest, WebhookField):
    """POST /v1/jobs on text2image: the /infer body plus an optional `webhook`."""


class Image2TextJobRequest(Image2TextRequest, WebhookField):
    """POST /v1/jobs on image2text: the /infer body plus an optional `webhook`."""


class Timings(BaseModel):
    queue_ms: float
    inference_ms: float
    total_ms: float


class Text2ImageResponse(BaseModel):
    image_base64: str
    format: ImageFormat
    width: int
    height: int
    seed: int
    timings: Timings


MAX_LISTED_ERRORS = 5  # an error message names at most this many problems, then counts the rest


FIELD_PATH = re.compile(r"^[A-Za-z_]\w*(\[\d+\]|\.\w+)*$")  # tools, images[1].max_pixels


def field_path(loc: Sequence[str | int]) -> str:
    """A pydantic error location as the service names fields everywhere else:
    `images[1].max_pixels`, as the media and whole-body checks write it; `body` and the
    names of union branches (`<text>`, `<object>`, `<message>`: in angle brackets) are left
    out."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "body" and not (part.startswith("<") and part.endswith(">")):
            path += f".{part}" if path else str(part)
    return path


def describe_validation_errors(errors: list[Any]) -> tuple[str, str | None]:
    """One readable message naming the first few bad fields, plus the first one for `param`.

    The message never grows with the body: a body with two million bad items gets a few lines
    and a count, not two million lines.
    """
    parts, first = [], None
    for item in errors[:MAX_LISTED_ERRORS]:
        loc = field_path(item.get("loc", ())) or "body"
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        name, sep, rest = message.partition(": ")
        if sep and FIELD_PATH.match(name) and (loc == "body" or item.get("type") == "value_error"):
            # A check of a whole body, or of an object in it, that names its field, e.g.
            # "tools: ..." or `messages[2]`'s "content: ...".
            loc, message = (name if loc == "body" else f"{loc}.{name}"), rest
        first = first or loc
        if item.get("type") == "extra_forbidden":
            message = "is not a known field"
        parts.append(f"{loc[:200]}: {message[:500]}")
    if len(errors) > MAX_LISTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_LISTED_ERRORS} more problems")
    return "; ".join(parts), first

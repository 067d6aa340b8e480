"""The typed inputs and outputs of each model type, apart from the models that implement them.

The HTTP layer builds and reads these; it never imports `flux.py` or `qwen_vl.py`, which stay
free to import torch and diffusers at will.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass(frozen=True)
class Text2ImageInput:
    prompt: str
    width: int
    height: int
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    count: int = 1  # images to make; image i uses seed + i
    loras: tuple[tuple[str, float], ...] = ()  # (adapter name, scale), sorted by name
    edit: ImageEdit | None = None  # image-to-image or inpainting; None: from text alone


@dataclass(frozen=True)
class ImageEdit:
    """An input image to start from, already decoded and at the output's size.

    Without a mask the whole image is reworked (image-to-image); with one, its white parts are
    repainted and every pixel where it is black comes back as sent (inpainting). `strength`
    (0 to 1] is how far from the input the result may go: the share of the steps that run.
    """

    image: Image
    strength: float
    mask: Image | None = None  # mode "L", the image's size


@dataclass(frozen=True)
class Text2ImageOutput:
    images: tuple[Image, ...]
    seed: int
    num_inference_steps: int

    @property
    def image(self) -> Image:
        return self.images[0]


@dataclass(frozen=True)
class Video:
    """A decoded video: the frames sampled from it, each already at its model size (sides
    multiples of 28; an even count), and how many were taken per second of the video."""

    frames: tuple[Image, ...]
    fps: float
    digest: bytes  # of the file and the sampling: the key of its encoder output


# (min_pixels, max_pixels): an image's own resize bounds; None takes the request's, then the
# server's (Qwen's floor, VL_MAX_PIXELS).
PixelRange = tuple[int | None, int | None]


@dataclass(frozen=True)
class ChatMessage:
    """One turn. `images` and `videos` are already decoded and validated; they precede the text
    in the turn, images first. `image_pixels`, when given, holds each image's own bounds (a
    video's frames were sized while decoding)."""

    role: str
    text: str
    images: tuple[Image, ...] = ()
    videos: tuple[Video, ...] = ()
    image_pixels: tuple[PixelRange, ...] = ()

    def __post_init__(self) -> None:
        if self.image_pixels and len(self.image_pixels) != len(self.images):
            raise ValueError("image_pixels needs one entry per image")

    def pixels(self, index: int) -> PixelRange:
        return self.image_pixels[index] if self.image_pixels else (None, None)


@dataclass(frozen=True)
class OutputGrammar:
    """A compiled `response_format`: the text must follow `grammar` (llguidance's format)."""

    grammar: str
    kind: str  # "json_object" or "json_schema"
    name: str = ""


@dataclass(frozen=True)
class Image2TextInput:
    messages: tuple[ChatMessage, ...]
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: OutputGrammar | None = None  # structured output; None: free text
    # Each image's pixel budget after resizing; None: the server's (VL_MAX_PIXELS, Qwen's floor)
    min_pixels: int | None = None
    max_pixels: int | None = None


@dataclass(frozen=True)
class Image2TextOutput:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length", as in OpenAI's API

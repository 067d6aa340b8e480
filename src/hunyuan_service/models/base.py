"""The model contract every model type implements, and helpers to pick a device and dtype."""

from __future__ import annotations

import abc
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from hunyuan_service.errors import JobCancelled, ModelLoadError

if TYPE_CHECKING:
    from hunyuan_service.models.types import PixelRange
    from hunyuan_service.settings import Settings

InputT = TypeVar("InputT")
OutputT = TypeVar("OutputT")


@dataclass
class JobContext:
    """What a running job can ask of the service: should it stop, and where to report progress.

    `should_stop` is polled by the model between denoising steps or tokens. `on_progress(step,
    total)` and `on_token(text)` report to whoever streams or polls the job; they are cheap and
    thread-safe.
    """

    should_stop: Callable[[], bool] = lambda: False
    on_progress: Callable[[int, int], None] = lambda _step, _total: None
    on_token: Callable[[str], None] = lambda _text: None
    stop_reason: Callable[[], str] = lambda: "cancelled"
    wants_tokens: bool = True  # False: nobody reads `on_token`, so text need not be decoded

    def raise_if_stopped(self) -> None:
        if self.should_stop():
            raise JobCancelled(f"job stopped: {self.stop_reason()}", code=self.stop_reason())


@dataclass
class ModelInfo:
    """What /health reports about the loaded model."""

    model_type: str
    model_id: str
    demo: bool
    device: str = "unloaded"
    dtype: str = "unloaded"
    extra: dict[str, Any] = field(default_factory=dict)


class InferenceModel(abc.ABC, Generic[InputT, OutputT]):
    """One model type. The service calls `load()` once, then `infer()` from one thread at a time.

    Subclasses keep `__init__` cheap: it must not import torch or touch the disk. `load()` does
    the heavy work and runs off the event loop. `infer()` is synchronous and is never called
    concurrently, so it may keep per-call state on the instance.
    """

    model_type: ClassVar[str]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.info = ModelInfo(
            model_type=self.model_type, model_id=settings.model_id, demo=settings.is_demo
        )
        # What `load` is doing now ("downloading ...", "loading model"), for /health and the
        # log; the engine replaces it before calling `load`. Called from the loading thread.
        self.report: Callable[[str], None] = lambda _phase: None

    @abc.abstractmethod
    def load(self) -> None:
        """Loads weights onto the device. Raises on failure; the service then refuses to start."""

    def warm_up(self) -> None:
        """Runs the WARMUP shapes once after `load`, so compilation happens before /ready."""

    @abc.abstractmethod
    def infer(self, request: InputT, ctx: JobContext) -> OutputT:
        """Runs one request. Raises `JobCancelled` when `ctx.should_stop()` turns true mid-run."""

    def prepare_image(self, image: Any, pixels: PixelRange, param: str) -> Any:
        """Shapes a client's image for the model as it is decoded, on the CPU pool: work that
        needs no device and that would otherwise hold up the model thread (and every job
        running there). `pixels` are the image's resize bounds as the request gave them;
        `param` names the image in a 4xx `ServiceError` for an image the model cannot take.
        Returns `image` as it is by default."""
        return image

    # Batching (MAX_BATCH_SIZE > 1): a model that sets `supports_batching` runs compatible
    # requests together in `infer_batch`.
    supports_batching: ClassVar[bool] = False

    def batch_key(self, request: InputT) -> Hashable | None:
        """Requests with equal keys may share a batch; None means this one always runs alone."""
        return None

    def infer_batch(
        self, requests: list[InputT], contexts: list[JobContext]
    ) -> list[OutputT | BaseException]:
        """Runs compatible requests together; returns each row's output or exception, in order.

        Each row honours its own context: its progress and tokens go to its own job, and a row
        whose `should_stop()` turns true gets `JobCancelled` (its work may stop early or be
        discarded). Raises `JobCancelled` only when every row has stopped.
        """
        raise NotImplementedError(f"{type(self).__name__} does not batch")

    def decodes_continuously(self) -> bool:
        """Continuous batching (MAX_BATCH_SIZE > 1): jobs go to `serve_continuously` instead,
        which takes new ones between its decode steps."""
        return False

    def serve_continuously(self, feed: Any) -> None:
        """Runs on the model thread while there is work: takes jobs from `feed.take()` between
        steps (key, input, context), reports each one's output or exception with
        `feed.finished(key, outcome)` as soon as its row ends, and returns once
        `feed.close_if_idle()` agrees that nothing is left. See `engine/continuous.py`."""
        raise NotImplementedError(f"{type(self).__name__} does not decode continuously")

    def caches(self) -> dict[str, Any]:
        """The model's reuse caches by name (`models/caches.py`), for /metrics."""
        return {}

    def recover_from_oom(self) -> None:
        """Frees what an out-of-memory failure left behind, so the next job can run."""

    def is_out_of_memory(self, error: BaseException) -> bool:
        """Whether `error` means the accelerator ran out of memory."""
        return False


class TorchModel(InferenceModel[InputT, OutputT]):
    """A model on a torch device: picks the device and dtype, and recovers from out-of-memory."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.device = "cpu"

    def place(self) -> Any:
        """Resolves DEVICE and DTYPE, records them for /health, and returns the torch dtype."""
        from hunyuan_service.models.compilations import install

        install()  # /metrics counts compilations after /ready
        self.device = resolve_device(self.settings.device)
        dtype = resolve_dtype(self.settings.dtype, self.device)
        self.info.device = self.device
        self.info.dtype = str(dtype).removeprefix("torch.")
        return dtype

    def is_out_of_memory(self, error: BaseException) -> bool:
        return torch_is_out_of_memory(error)

    def recover_from_oom(self) -> None:
        torch_empty_cache(self.device)


def resolve_device(requested: str) -> str:
    """Picks cuda, then mps, then cpu for 'auto'; refuses a device that is not present."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("DEVICE=cuda but no CUDA device is available")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("DEVICE=mps but MPS is not available")
    return requested


def resolve_dtype(requested: str, device: str) -> Any:
    """bf16 on CUDA where supported (else fp16), fp16 on mps, fp32 on cpu, unless DTYPE says."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def torch_is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA/MPS out-of-memory errors, without importing torch when it is not loaded."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def torch_empty_cache(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
    elif device == "mps":
        torch.mps.empty_cache()

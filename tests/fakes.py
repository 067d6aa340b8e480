"""Small fake models for queue and worker tests; end-to-end tests use the tiny real models."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hunyuan_service.errors import JobCancelled
from hunyuan_service.models.base import InferenceModel, JobContext
from hunyuan_service.settings import Settings


def fake_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"model_id": "fake/model", "max_queue_size": 4}
    values.update(overrides)
    return Settings(_env_file=None, **values)


class FakeModel(InferenceModel[Any, Any]):
    """Records every call; subclasses choose what a call does."""

    model_type = "text2image"

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__(settings or fake_settings())
        self.calls: list[Any] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self.loaded = False

    def load(self) -> None:
        self.loaded = True
        self.info.device, self.info.dtype = "cpu", "float32"

    def infer(self, request: Any, ctx: JobContext) -> Any:
        with self._lock:
            self.calls.append(request)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            return self.run(request, ctx)
        finally:
            with self._lock:
                self.active -= 1

    def run(self, request: Any, ctx: JobContext) -> Any:
        return {"echo": request}


class BlockingModel(FakeModel):
    """Each call waits until the test sets `release` (or the job is cancelled)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.started = threading.Event()

    def run(self, request: Any, ctx: JobContext) -> Any:
        self.started.set()
        while not self.release.wait(0.01):
            ctx.raise_if_stopped()
        return {"echo": request}


@dataclass
class StepLog:
    steps_run: int = 0
    stopped_early: list[Any] = field(default_factory=list)


class SteppingModel(FakeModel):
    """Sleeps `step_s` per step for `steps` steps, emitting progress and honouring cancellation."""

    def __init__(self, steps: int = 10, step_s: float = 0.02, settings: Settings | None = None):
        super().__init__(settings)
        self.steps, self.step_s = steps, step_s
        self.log = StepLog()

    def run(self, request: Any, ctx: JobContext) -> Any:
        for step in range(self.steps):
            time.sleep(self.step_s)
            self.log.steps_run += 1
            ctx.on_progress(step + 1, self.steps)
            try:
                ctx.raise_if_stopped()
            except JobCancelled:
                self.log.stopped_early.append(request)
                raise
        return {"echo": request}


class FailingModel(FakeModel):
    """Raises for requests equal to 'boom' (or 'oom', as an out-of-memory error); echoes others."""

    def __init__(self) -> None:
        super().__init__()
        self.oom_recoveries = 0

    def run(self, request: Any, ctx: JobContext) -> Any:
        if request == "boom":
            raise ValueError("model exploded")
        if request == "oom":
            raise FakeOutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return {"echo": request}

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, FakeOutOfMemoryError)

    def recover_from_oom(self) -> None:
        self.oom_recoveries += 1


class FakeOutOfMemoryError(RuntimeError):
    """Stands in for torch.cuda.OutOfMemoryError, which cannot be raised without CUDA."""


class FakeImageModel(SteppingModel):
    """A stepping model that answers text2image requests with a blank image of the asked size."""

    def run(self, request: Any, ctx: JobContext) -> Any:
        from PIL import Image

        from hunyuan_service.models.types import Image2TextOutput, Text2ImageOutput

        if hasattr(request, "messages"):  # an image2text request
            super().run(request.messages[0].text, ctx)
            return Image2TextOutput(
                text="fake answer", prompt_tokens=3, completion_tokens=2, finish_reason="stop"
            )
        if request.prompt == "boom":
            raise ValueError("model exploded")
        if request.prompt == "oom":
            raise FakeOutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        super().run(request.prompt, ctx)
        image = Image.new("RGB", (request.width, request.height), (10, 20, 30))
        return Text2ImageOutput(
            images=(image,), seed=request.seed or 0, num_inference_steps=self.steps
        )

    def infer(self, request: Any, ctx: JobContext) -> Any:
        if not self.gate.wait(timeout=120):
            raise AssertionError("FakeImageModel.gate was never opened: the test forgot to")
        return super().infer(request, ctx)

    def __init__(self, steps: int = 5, step_s: float = 0.01, settings: Settings | None = None):
        super().__init__(steps, step_s, settings)
        self.gate = threading.Event()
        self.gate.set()
        self.oom_recoveries = 0

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, FakeOutOfMemoryError)

    def recover_from_oom(self) -> None:
        self.oom_recoveries += 1


class BatchingModel(FakeModel):
    """Batches requests whose `key` matches; records each call's rows; can run out of memory.

    A request is a dict: {"id", "key"}; `key` None means it never batches. Each row steps
    `steps` times, emitting progress with total = 100 + its position in the batch, so a test can
    tell whose events reached whom.
    """

    supports_batching = True

    def __init__(self, steps: int = 3, step_s: float = 0.001, oom_above: int | None = None):
        super().__init__()
        self.steps, self.step_s, self.oom_above = steps, step_s, oom_above
        self.batches: list[list[Any]] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()
        self.stopped_rows: list[Any] = []
        self.oom_recoveries = 0
        self.gates: dict[Any, threading.Event] = {}  # a batch holding this id waits for it
        self.running_ids: list[Any] = []

    def batch_key(self, request: Any) -> Any:
        return request.get("key")

    def run(self, request: Any, ctx: JobContext) -> Any:
        return self.infer_batch([request], [ctx])[0]

    def infer_batch(self, requests: list[Any], contexts: list[JobContext]) -> list[Any]:
        ids = [request["id"] for request in requests]
        if self.oom_above is not None and len(requests) > self.oom_above:
            raise FakeOutOfMemoryError("CUDA out of memory (batch too large)")
        self.batches.append(ids)
        self.running_ids = ids
        self.started.set()
        gates = [self.release] + [self.gates[i] for i in ids if i in self.gates]
        for gate in gates:
            while not gate.wait(0.005):
                if all(ctx.should_stop() for ctx in contexts):
                    raise JobCancelled("all rows stopped")
        for step in range(self.steps):
            time.sleep(self.step_s)
            live = [i for i, ctx in enumerate(contexts) if not ctx.should_stop()]
            if not live:
                raise JobCancelled("all rows stopped")
            for i in live:
                contexts[i].on_progress(step + 1, 100 + i)
        outputs: list[Any] = []
        for request, ctx in zip(requests, contexts, strict=True):
            if ctx.should_stop():
                self.stopped_rows.append(request["id"])
                outputs.append(JobCancelled("row stopped"))
            else:
                outputs.append({"echo": request["id"], "batch": ids})
        return outputs

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, FakeOutOfMemoryError)

    def recover_from_oom(self) -> None:
        self.oom_recoveries += 1


class SlowStartModel(FakeModel):
    """`load` and `warm_up` each wait for the test to release them; `fail` makes `load` raise."""

    def __init__(self, settings: Settings | None = None, fail: BaseException | None = None):
        super().__init__(settings)
        self.fail = fail
        self.loading, self.load_release = threading.Event(), threading.Event()
        self.warming, self.warm_release = threading.Event(), threading.Event()

    def load(self) -> None:
        self.loading.set()
        assert self.load_release.wait(60), "the test never released load()"
        if self.fail is not None:
            raise self.fail
        super().load()

    def warm_up(self) -> None:
        self.warming.set()
        assert self.warm_release.wait(60), "the test never released warm_up()"

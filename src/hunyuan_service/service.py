"""The running service's state, owned by the lifespan and handed to routes as a dependency."""

from __future__ import annotations

import asyncio
import enum
import functools
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from hunyuan_service import __version__
from hunyuan_service.models.base import InferenceModel
from hunyuan_service.settings import Settings
from hunyuan_service.worker import Scheduler

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Phase(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class Service:
    """What the lifespan owns and the routes use: settings, the model and its scheduler."""

    def __init__(self, settings: Settings, model: InferenceModel | None) -> None:
        self.settings = settings
        self.model = model
        self.scheduler: Scheduler | None = None
        self.phase = Phase.STARTING
        self.started_at = time.time()
        # Decoding client images and encoding results run here, not on the event loop and not
        # in the default pool that `asyncio.to_thread(model.infer)` uses, so they never delay a job.
        self.cpu_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hunyuan-cpu")

    async def run_cpu(self, function: Callable[..., T], *args: Any) -> T:
        """Runs CPU-bound pre- or post-processing on the service's own thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.cpu_pool, functools.partial(function, *args))

    def begin_drain(self) -> None:
        """Called on SIGTERM/SIGINT: /ready turns 503 and new requests are refused at once."""
        if self.phase is Phase.READY:
            logger.info("draining: no new requests; finishing admitted ones")
        self.phase = Phase.DRAINING
        if self.scheduler is not None:
            self.scheduler.accepting = False

    def status(self) -> dict[str, Any]:
        scheduler = self.scheduler
        body: dict[str, Any] = {"status": self.phase.value, "version": __version__}
        if self.model is not None:
            info = self.model.info
            body.update(
                model_type=info.model_type,
                model_id=info.model_id,
                demo=info.demo,
                device=info.device,
                dtype=info.dtype,
                **info.extra,
            )
            if info.demo:
                body["notice"] = "DEMO MODEL: tiny random weights; outputs are noise"
        body.update(
            worker_alive=scheduler.worker_alive if scheduler else False,
            queue_depth=scheduler.queue_depth if scheduler else 0,
            max_queue_size=self.settings.max_queue_size,
            busy=scheduler.busy if scheduler else False,
        )
        return body


async def get_service(request: Request) -> Service:
    # async on purpose: FastAPI runs a plain `def` dependency in a thread pool, which costs two
    # thread hops on every request.
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


_ID_PREFIX = uuid.uuid4().hex[:12]
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """A unique id: a random per-process prefix plus a counter.

    uuid4() reads os.urandom, which took ~100 microseconds per call on the development VMs; that
    is a third of a bare FastAPI request.
    """
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", None) or new_request_id()

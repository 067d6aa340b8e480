"""The compilation counter behind hunyuan_compilations_after_ready_total."""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from hunyuan_service.engine.engine import Engine
from hunyuan_service.models.base import JobContext
from hunyuan_service.models.compilations import compilations, install
from tests.fakes import FakeModel, fake_settings


def test_each_new_compilation_counts_once_and_a_cached_one_never() -> None:
    install()
    install()  # idempotent: one callback, one count per compilation

    @torch.compile(backend="eager", dynamic=False)
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    before = compilations()
    double(torch.ones(3))
    assert compilations() == before + 1
    double(torch.ones(3))  # the same shape: the compiled frame is reused
    assert compilations() == before + 1
    double(torch.ones(5))  # a new static shape compiles again
    assert compilations() == before + 2


class CompilingModel(FakeModel):
    """Meets a new shape on every call: what a model that recompiles after ready looks like."""

    def run(self, request: Any, ctx: JobContext) -> Any:
        compiled = torch.compile(lambda x: x + 1, backend="eager", dynamic=False)
        compiled(torch.zeros(2 + len(self.calls)))
        return {"echo": request}


def test_the_engine_counts_compilations_after_ready_only() -> None:
    async def scenario() -> None:
        install()
        engine = Engine(fake_settings(), CompilingModel())
        assert engine.compilations_after_ready() == 0  # not ready yet
        torch.compile(lambda x: x - 1, backend="eager")(torch.zeros(2))  # before ready
        await engine.start()
        assert engine.compilations_after_ready() == 0
        for i in range(2):
            await engine.submit(f"job{i}", f"r{i}").result()
        assert engine.compilations_after_ready() == 2
        await engine.stop()

    asyncio.run(asyncio.wait_for(scenario(), timeout=120))

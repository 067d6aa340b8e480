"""Counts the host's reads of tensor values: on a GPU each one waits for the device."""

from __future__ import annotations

import collections
import traceback
from pathlib import Path
from typing import Any

from torch.overrides import TorchFunctionMode


class HostReads(TorchFunctionMode):
    """Within the block, counts each read of a tensor's value (`.item()`, `.tolist()`, `bool()`,
    `int()`, ...) by the (file, function) that made it; with `within`, only reads made under a
    call of a function of that name."""

    def __init__(self, within: str | None = None) -> None:
        import torch

        super().__init__()
        self.within = within
        self.sites: collections.Counter[tuple[str, str]] = collections.Counter()
        tensor = torch.Tensor
        self.reads: set[Any] = {tensor.item, tensor.tolist, tensor.__bool__, tensor.__int__}
        self.reads |= {tensor.__float__, tensor.__index__, tensor.numpy}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in self.reads:
            stack = traceback.extract_stack()[:-1]
            if self.within is None or any(frame.name == self.within for frame in stack):
                caller = stack[-1]
                self.sites[(Path(caller.filename).name, caller.name)] += 1
        return func(*args, **(kwargs or {}))

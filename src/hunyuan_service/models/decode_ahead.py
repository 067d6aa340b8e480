"""DECODE_AHEAD: the host queues decode step n+1 while the device still runs step n.

After every step, transformers' `generate` reads `unfinished_sequences.max() == 0` on the host,
and the streamer reads the new tokens. Both wait for the device to finish the step, so the
Python between two steps (input preparation, stopping criteria, sampling, launching the next
graph) never overlaps the device's work. With the compiled Qwen decode step as a CUDA graph,
that Python is one part of what separates a 10 ms step of the 7B model on an H100 from the
~5 ms memory-bandwidth limit; how large a part only a GPU run can tell (issue 9;
docs/performance.md). On the CPU, with the tiny model, counting the tensor reads of a decode
(`tests/e2e/test_speed_options.py`) finds exactly these two per token and no others.

transformers has the mechanism: `DeferredStopCheck` copies the flag and the tokens without
waiting and reads them one step later, at the price of one extra step that it then undoes. It
enables it on Apple's MPS only. `ahead_of_the_device()` puts our own check of the same contract
in its place for one `generate` call, on any device; the service runs one `generate` at a time,
on its model thread, so the swap is never seen by another call. Tokens are unchanged; a stop (an
end-of-text token, a cancel) takes effect one step later, and streamed text lags one step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from hunyuan_service.errors import ModelLoadError


def check_supported() -> None:
    """Refuses DECODE_AHEAD at load when this transformers has no stop check to replace."""
    from transformers.generation import utils as generation

    if not hasattr(generation, "DeferredStopCheck"):
        raise ModelLoadError(
            "DECODE_AHEAD needs a transformers version whose generate defers its stop check "
            "(5.x with transformers.generation.utils.DeferredStopCheck); unset DECODE_AHEAD"
        )


@contextlib.contextmanager
def ahead_of_the_device(enabled: bool) -> Iterator[None]:
    """Within this block, `generate` reads each step's stop flag and tokens one step late."""
    if not enabled:
        yield
        return
    from transformers.generation import utils

    generation: Any = utils  # `_sample` looks the class up in this module at each call
    replaced = generation.DeferredStopCheck
    generation.DeferredStopCheck = StepAheadStopCheck
    try:
        yield
    finally:
        generation.DeferredStopCheck = replaced


class StepAheadStopCheck:
    """Copies each step's stop flag and tokens to the host without waiting; reads them a step
    later. The contract of transformers' `DeferredStopCheck`: `is_supported`, a call per step
    that says whether to stop, and `finish`, which says how many steps to undo.

    Each step's flag and tokens go to the host together (`LateCopy`, two slots): step k copies
    into one while the copy of step k-1, in the other, is waited for (by then it is done or
    nearly) and read.
    """

    @staticmethod
    def is_supported(
        device: Any, cache: Any, cache_is_returned: bool, is_assistant: bool = False
    ) -> bool:
        # Undoing a step must not leave its key/value entries in a cache the caller keeps.
        return not cache_is_returned and not is_assistant

    def __init__(
        self,
        input_ids: Any,
        max_length: int | None,
        cache: Any,
        cache_is_returned: bool,
        streamer: Any = None,
    ) -> None:
        self.max_length, self.streamer = max_length, streamer
        self.late = LateCopy(input_ids.device, slots=2)  # step k copies while k-1 is read
        self.last: Any = None  # the latest step's copy, unread
        self.stop_seen = False  # a step's flag said every row had finished

    def __call__(self, unfinished_sequences: Any, tokens: Any, length: int) -> bool:
        import torch

        flag = (unfinished_sequences.max() == 0).reshape(1).to(tokens.dtype)
        previous, self.last = self.last, self.late.send(torch.cat([flag, tokens.reshape(-1)]))
        if previous is not None:
            held = self.late.read(previous)  # the step before this one: done, or nearly
            if self.streamer is not None:
                self.streamer.put(held[1:].clone())
            self.stop_seen = bool(held[0])
        return self.stop_seen or (self.max_length is not None and length >= self.max_length)

    def finish(self) -> int:
        """1 when the last step ran after every row had stopped: generate drops its tokens."""
        if self.stop_seen:
            return 1
        if self.last is not None and self.streamer is not None:  # the last step's tokens
            self.streamer.put(self.late.read(self.last)[1:].clone())
        return 0


class LateCopy:
    """Copies 1-D device tensors into host memory without waiting, to be read later.

    On CUDA each slot is a pinned buffer with an event: the copy is queued on the stream ahead of
    whatever is queued after it, and reading waits for that copy only, not for the work behind
    it. On the CPU the copy is done at once. `slots` copies may be unread at once; a slot is
    written again by the `slots`-th send after it, which must come after its read.
    """

    def __init__(self, device: Any, slots: int = 1) -> None:
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.slots: list[tuple[Any, Any]] = [(None, None)] * slots
        self.sent = 0

    def send(self, tensor: Any) -> tuple[int, int]:
        """Starts copying `tensor`; returns what `read` takes."""
        import torch

        slot = self.sent % len(self.slots)
        self.sent += 1
        buffer, event = self.slots[slot]
        count = int(tensor.shape[0])
        if buffer is None or buffer.shape[0] < count or buffer.dtype != tensor.dtype:
            buffer = torch.empty(max(count, 64), dtype=tensor.dtype, pin_memory=self.cuda)
            event = torch.cuda.Event() if self.cuda else None
            self.slots[slot] = (buffer, event)
        buffer[:count].copy_(tensor, non_blocking=True)
        if event is not None:
            event.record()
        return slot, count

    def read(self, sent: tuple[int, int]) -> Any:
        """The copied values on the host (until the slot is written again)."""
        slot, count = sent
        buffer, event = self.slots[slot]
        if event is not None:
            event.synchronize()
        return buffer[:count]

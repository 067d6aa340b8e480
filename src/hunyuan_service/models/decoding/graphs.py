"""The continuous decoder's step at fixed shapes: padded to buckets, captured as CUDA graphs.

An eager decode step launches some twenty kernels per layer, and at batch 1 a 7B model's step
is shorter than the time the CPU takes to launch them. A CUDA graph replays the whole step with
one launch, but only at the shapes it was captured with. So the step's two sizes go into
buckets:

- rows: powers of two up to MAX_BATCH_SIZE (and MAX_BATCH_SIZE itself); the rows past the real
  ones are padding that reads and writes the pool's scratch position;
- width (the positions attention reads per row): powers of two from 256 up to the pool's
  capacity; the positions past a row's length are masked out.

Every bucket is captured at load, before the service is ready, so nothing is captured or
compiled while serving. With COMPILE=full the step's decoder layer is compiled first (one
function for every layer, dynamic shapes, so a couple of compilations serve every layer and
bucket), which fuses its small kernels, then captured.
Buckets of more than `budget` rows times positions are not captured (their gathered keys and
values would need too much memory): a step that needs one runs eagerly at its exact shape, as
every step does off CUDA or with CUDA_GRAPHS=false.

Captured graphs share one memory pool; a replay's logits are copied out before the next step,
so reusing that memory between buckets is safe.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

SMALLEST_WIDTH = 256
# The step's integer inputs, one row each in a [5, rows] tensor.
TOKEN, AT, ROTARY, LENGTH, START = range(5)


def step_inputs(values: list[list[int]], device: Any, tokens: Any = None) -> Any:
    """The step's integer inputs [5, rows] on `device`. The copy does not wait for the device
    (from pageable memory, its source is staged at once); `tokens` [n] on the device, when
    given, replace the first n rows' TOKEN (DECODE_AHEAD's unread tokens)."""
    import torch

    inputs = torch.tensor(values).to(device, non_blocking=True)
    if tokens is not None:
        inputs[TOKEN, : tokens.shape[0]] = tokens
    return inputs


def row_buckets(max_rows: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 < max_rows:
        sizes.append(sizes[-1] * 2)
    if max_rows > 1:
        sizes.append(max_rows)
    return sizes


def width_buckets(capacity: int) -> list[int]:
    sizes = [SMALLEST_WIDTH]
    while sizes[-1] < capacity:
        sizes.append(sizes[-1] * 2)
    return sizes


class PaddedStep:
    """Runs `forward(inputs [5, rows], width) -> logits [rows, vocab]` at bucketed shapes.

    Args:
        forward: the decode step at a given shape (`DecodeBatch._forward`).
        eager: the same step without compilation, for steps past every bucket.
        scratch: the pool position padding rows use.
        max_rows: MAX_BATCH_SIZE.
        capacity: the pool's positions (the widest a row can be).
        budget: the most rows times width captured.
        device: where the step runs; graphs are captured only on CUDA.
        capture: False pads to the buckets but runs eagerly (how tests check the padding).
        compiled: `forward` compiles on first use: `prepare` runs every bucket once, so
            nothing compiles while serving (steps past every bucket run `eager`).
    """

    def __init__(
        self,
        forward: Callable[[Any, int], Any],
        scratch: int,
        max_rows: int,
        capacity: int,
        budget: int,
        device: Any,
        capture: bool,
        compiled: bool = False,
        eager: Callable[[Any, int], Any] | None = None,
    ) -> None:
        self.forward = forward
        self.eager = eager or forward
        self.compiled = compiled
        self.scratch = scratch
        self.rows = row_buckets(max_rows)
        self.widths = width_buckets(capacity)
        self.budget = budget
        self.device = device
        self.capture = capture
        self.graphs: dict[tuple[int, int], tuple[Any, Any]] = {}
        self.inputs: dict[int, Any] = {}
        self.replays = 0  # steps run as a captured graph
        self.padded_steps = 0  # steps run eagerly at a bucket's shape (no graph captured)
        self.eager_steps = 0  # steps past every bucket, run at their exact shape
        self.padded_rows = 0  # padding rows run in all

    def buckets(self) -> list[tuple[int, int]]:
        return [
            (rows, width)
            for rows in self.rows
            for width in self.widths
            if rows * width <= self.budget
        ]

    def bucket(self, count: int, width: int) -> tuple[int, int] | None:
        rows_at = bisect.bisect_left(self.rows, count)
        width_at = bisect.bisect_left(self.widths, width)
        if rows_at == len(self.rows) or width_at == len(self.widths):
            return None
        shape = (self.rows[rows_at], self.widths[width_at])
        return shape if shape[0] * shape[1] <= self.budget else None

    def padded(self, values: list[list[int]], rows: int) -> list[list[int]]:
        """The step's inputs with `rows - count` padding rows on the scratch position."""
        pad = rows - len(values[TOKEN])
        fill = {TOKEN: 0, AT: self.scratch, ROTARY: 0, LENGTH: 1, START: self.scratch}
        return [column + [fill[index]] * pad for index, column in enumerate(values)]

    def prepare(self) -> None:
        """Runs every bucket once (compiling it, if compiled) and captures its graph (on CUDA,
        with capture on); a no-op for plain eager padding."""
        if not (self.capture or self.compiled):
            return
        import torch

        started = time.monotonic()
        for rows in self.rows:
            self.inputs[rows] = torch.tensor(
                self.padded([[] for _ in range(5)], rows), device=self.device
            )
        if not self.capture:
            # Made as `run` makes them (inference tensors), or the compiled step's guards would
            # tell them apart and compile again at the first real step.
            with torch.inference_mode():
                for rows, width in self.buckets():
                    self.forward(step_inputs(self.inputs[rows].tolist(), self.device), width)
            logger.info(
                "compiled the decode step for %d buckets in %.1f s",
                len(self.buckets()),
                time.monotonic() - started,
            )
            return
        memory = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        # The largest first, so the smaller ones fit in the memory it took.
        order = sorted(self.buckets(), key=lambda shape: -shape[0] * shape[1])
        with torch.inference_mode():
            with torch.cuda.stream(stream):
                for rows, width in order:
                    self.forward(self.inputs[rows], width)  # lazy initialisations, off the graph
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for rows, width in order:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=memory):
                    logits = self.forward(self.inputs[rows], width)
                self.graphs[(rows, width)] = (graph, logits)
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured the decode step%s as %d CUDA graphs (rows up to %d, widths up to %d) in "
            "%.1f s",
            ", compiled," if self.compiled else "",
            len(self.graphs),
            self.rows[-1],
            max(width for _rows, width in self.graphs),
            time.monotonic() - started,
        )

    def run(self, values: list[list[int]], width: int, tokens: Any = None) -> Any:
        """Logits [rows, vocab] (float32, this step's own copy) for the real rows; `tokens`
        [rows] on the device, when given, replace the TOKEN inputs (DECODE_AHEAD's unread
        tokens)."""
        import torch

        count = len(values[TOKEN])
        shape = self.bucket(count, width)
        if shape is None:
            self.eager_steps += 1
            return self.eager(step_inputs(values, self.device, tokens), width).float()
        rows, padded_width = shape
        padded = self.padded(values, rows)
        self.padded_rows += rows - count
        captured = self.graphs.get(shape)
        if captured is None:
            self.padded_steps += 1
            logits = self.forward(step_inputs(padded, self.device, tokens), padded_width)
            return logits[:count].float()
        graph, logits = captured
        inputs = self.inputs[rows]
        # From pageable memory, so the source is staged at once; nothing waits for the device.
        inputs.copy_(torch.tensor(padded), non_blocking=True)
        if tokens is not None:
            inputs[TOKEN, :count] = tokens
        graph.replay()
        self.replays += 1
        # A copy: the graph's own output memory is reused by the next replay of any bucket.
        return logits[:count].to(torch.float32, copy=True)

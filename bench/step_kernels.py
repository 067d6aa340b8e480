"""Kernels per decode step: what the continuous decoder's step launches on a GPU, counted here.

The continuous decoder's step (models/decoding/batch.py) is captured as a CUDA graph, and at
batch 1 a 7B model's step is short enough that the number of kernels inside the graph, each
with its own start-up and tail, weighs against the time spent reading the weights. This script
counts those kernels without a GPU: it builds the real Qwen2.5-VL-7B text model shape with
fake tensors on a fake CUDA device (no memory, no GPU; torch's FakeTensorMode), runs one step
for 1, 8 and 32 rows through the decoder, and counts the ATen operations that reach the device,
which is where CUDA kernels are launched from. Views (reshapes, transposes, slices) launch
nothing and are counted apart. The count is exact and the same on every machine, so it needs no
baseline in the same run; compare it with the rows recorded in docs/benchmarks.md.

    uv run python bench/step_kernels.py               # about 30 s
    uv run python bench/step_kernels.py --ops         # and each layer's operations by kind
"""

import argparse
import collections
import os
import sys
from dataclasses import replace
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Operations that only describe memory already there, or read a tensor's metadata
# (`prim.*`): no kernel on the device.
VIEWS = frozenset(
    {
        "aten._unsafe_view", "aten.alias", "aten.as_strided", "aten.chunk", "aten.detach",
        "aten.expand", "aten.permute", "aten.reshape", "aten.select", "aten.slice",
        "aten.split", "aten.split_with_sizes", "aten.squeeze", "aten.t", "aten.transpose",
        "aten.unbind", "aten.unsqueeze", "aten.view",
    }
)  # fmt: skip


def launches(name: str) -> bool:
    return name not in VIEWS and not name.startswith("prim.")


def counting_mode() -> Any:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counting(TorchDispatchMode):
        """Counts every ATen operation dispatched while it is active, by name."""

        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter[str] = collections.Counter()

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            kwargs = kwargs or {}
            self.ops[str(func.overloadpacket)] += 1
            if func.overloadpacket is torch.ops.aten.scaled_dot_product_attention:
                # On CUDA, attention given a boolean mask first makes it additive: a -inf
                # scalar tensor filled on the device and a `where` (ATen's
                # convert_boolean_attn_mask). The fake device does not show them.
                mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
                if mask is not None and mask.dtype == torch.bool:
                    self.ops["aten.where (attention's boolean mask made additive)"] += 1
                    self.ops["aten.fill_ (its -inf)"] += 1
            if func.overloadpacket is torch.ops.aten.linear:
                # With a bias and one row, CUDA's addmm cannot use cuBLASLt's bias epilogue
                # (it needs more than one row: isInputCompliesAddmmCudaLt), so it first
                # copies the bias into the output, then runs the product onto it.
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                if bias is not None and args[0].numel() == args[0].shape[-1]:
                    self.ops["aten.copy_ (a bias into the output: one row)"] += 1
            return func(*args, **kwargs)

        def kernels(self) -> int:
            return sum(count for name, count in self.ops.items() if launches(name))

    return Counting()


def count_step(decoder: Any, rows: int, width: int) -> tuple[Any, Any]:
    """(the whole step's counts, one decoder layer's counts) for `rows` rows at `width`."""
    import torch

    from hunyuan_service.models.decoding import layer as layers
    from hunyuan_service.models.decoding.graphs import step_inputs

    values = [[5] * rows, list(range(rows)), [7] * rows, [8] * rows, list(range(rows))]
    layer = counting_mode()
    counted_once = False

    def first_layer_counted(*args: Any) -> Any:
        nonlocal counted_once
        if counted_once:
            return layers.decoder_layer(*args)
        counted_once = True
        with layer:
            return layers.decoder_layer(*args)

    whole = counting_mode()
    with torch.inference_mode():
        inputs = step_inputs(values, decoder.device)
        with whole:
            decoder._forward(inputs, width, layer_step=first_layer_counted)
    return whole, layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,8,32", help="comma-separated row counts")
    parser.add_argument("--width", type=int, default=256, help="positions each row attends to")
    parser.add_argument("--ops", action="store_true", help="list one layer's operations")
    args = parser.parse_args()

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.gpu import QWEN_7B
    from hunyuan_service.models.decoding.batch import DecodeBatch
    from hunyuan_service.models.tiny import build_qwen_vl

    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        model, processor = build_qwen_vl(replace(QWEN_7B, word_tokens=0), dtype=torch.bfloat16)
        decoder = DecodeBatch(
            model.eval(), processor.tokenizer, None, None, capacity=32 * args.width
        )
        layers = len(decoder.text_model.layers)
        print(
            f"Qwen2.5-VL-7B text model ({layers} layers), bf16, on a fake CUDA device; "
            f"torch {torch.__version__}; width {args.width}"
        )
        print(f"{'rows':>5s} {'kernels/step':>13s} {'per layer':>10s} {'outside layers':>15s}")
        for rows in (int(text) for text in args.rows.split(",")):
            whole, layer = count_step(decoder, rows, args.width)
            per_layer = layer.kernels()
            print(
                f"{rows:5d} {whole.kernels():13d} {per_layer:10d} "
                f"{whole.kernels() - layers * per_layer:15d}"
            )
        if args.ops:
            print("one layer's kernels by operation:")
            for name, count in layer.ops.most_common():
                if launches(name):
                    print(f"  {count:3d} {name}")


if __name__ == "__main__":
    main()

"""Load-time cost of COMPILE=full for the continuous decoder: the whole step against one layer.

The continuous decoder's step can be compiled whole (28 layers unrolled into one graph at the
7B shape: 200 s at load on an H200) or as one decoder-layer function that every layer calls
(what `DecodeBatch.pad_steps(compiled=True)` does). This builds random-weight Qwen2.5-VL text
stacks of growing depth on the CPU and times both ways of compiling every bucket of a
MAX_BATCH_SIZE of 4, with inductor's on-disk caches off so each compiles from scratch.

    TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0 \\
        uv run python bench/decoder_compile.py --layers 4,16      # about 3 minutes
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(layers: int) -> dict[str, tuple[float, int]]:
    import torch

    from hunyuan_service.models.decoding.graphs import PaddedStep
    from hunyuan_service.models.qwen_vl import QwenVLModel
    from hunyuan_service.models.tiny import build_tiny_qwen_vl
    from hunyuan_service.settings import Settings

    folder = Path(tempfile.mkdtemp())
    build_tiny_qwen_vl(folder, hidden_size=256, layers=layers, heads=4, intermediate_size=512)
    settings = Settings(
        _env_file=None,
        model_type="image2text",
        model_id=str(folder),
        device="cpu",
        max_batch_size=4,
        kv_cache_tokens=2048,
        warmup=[],
    )
    model = QwenVLModel(settings)
    model.load()
    decoder = model.decoder
    results = {}
    for way in ("the whole step", "one layer function"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        started = time.perf_counter()
        if way == "one layer function":
            decoder.pad_steps(4, capture=False, compiled=True)
        else:
            pool = decoder.pool
            step = PaddedStep(
                torch.compile(decoder._forward, dynamic=True),
                pool.scratch,
                4,
                pool.capacity,
                budget=2 * max(pool.capacity, 4 * 256),
                device=decoder.device,
                capture=False,
                compiled=True,
            )
            step.prepare()
        graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        results[way] = (time.perf_counter() - started, graphs)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="4,16")
    args = parser.parse_args()
    print("| layers | the whole step: s (graphs) | one layer function: s (graphs) | ratio |")
    print("| --- | --- | --- | --- |")
    for layers in (int(n) for n in args.layers.split(",")):
        whole, layer = (measure(layers)[way] for way in ("the whole step", "one layer function"))
        print(
            f"| {layers} | {whole[0]:.1f} ({whole[1]}) | {layer[0]:.1f} ({layer[1]}) | "
            f"{whole[0] / layer[0]:.1f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Where a step's time goes: one call under torch.profiler, reduced to a few numbers.

`bench/gpu.py --profile` profiles each service variant once after timing it. On CUDA the unit is
the GPU kernel: how long the device was busy (the union of kernel intervals) against the wall
time, and how that busy time splits into attention, matrix products, fused elementwise kernels
and copies. A decode step that is 60% busy waits on the host; one that is 100% busy is limited
by its kernels. On the CPU (`--device cpu --tiny`) top-level operators stand in for kernels, so
the script's own test exercises the same code. The profiler adds overhead on the host, so its
wall time is longer than the timed runs' and the busy fraction is a lower bound.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = (  # the first kind whose word is in a kernel's name, lower-cased
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad")),
    ("matmul", ("gemm", "mm", "matmul", "cutlass", "nvjet", "cublas", "linear")),
    ("fused elementwise", ("triton_", "elementwise", "vectorized", "reduce", "norm", "softmax")),
    ("copy", ("memcpy", "memset", "copy", "cat")),
)


@dataclass
class Profile:
    wall_s: float
    busy_s: float
    kernels: int
    by_kind: dict[str, float] = field(default_factory=dict)  # seconds
    top: list[tuple[str, float, int]] = field(default_factory=list)  # name, seconds, calls

    def line(self, per: int = 1, unit: str = "call") -> str:
        """One line for the report; `per` divides times, e.g. by the tokens of a decode."""
        kinds = ", ".join(
            f"{kind} {100 * seconds / self.busy_s:.0f}%"
            for kind, seconds in sorted(self.by_kind.items(), key=lambda item: -item[1])
            if self.busy_s > 0
        )
        return (
            f"per {unit}: wall {1000 * self.wall_s / per:.2f} ms, device busy "
            f"{1000 * self.busy_s / per:.2f} ms ({100 * self.busy_s / self.wall_s:.0f}%), "
            f"{self.kernels / per:.0f} kernels; busy time: {kinds}"
        )

    def table(self) -> str:
        rows = [f"| {name[:110]} | {1000 * s:.2f} | {calls} |" for name, s, calls in self.top]
        return "\n".join(["| kernel | ms | calls |", "| --- | --- | --- |", *rows]) + "\n"


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, words in KINDS if any(w in lowered for w in words)), "other")


def profile(call: Callable[[], Any], device: str, top: int = 15) -> Profile:
    """Runs `call` once under the profiler and summarises its kernels (CUDA) or operators."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiling

    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profiling(activities=activities) as profiler:
        start = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - start
    events = profiler.events()
    if device == "cuda":
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    else:
        kernels = [e for e in events if e.cpu_parent is None and e.name.startswith("aten::")]
    intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels)  # microseconds
    busy_us, reach = 0.0, float("-inf")
    for begin, end in intervals:  # the union's length
        if end > reach:
            busy_us += end - max(begin, reach)
            reach = end
    seconds: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    for event in kernels:
        seconds[event.name] += (event.time_range.end - event.time_range.start) / 1e6
        calls[event.name] += 1
    by_kind: Counter[str] = Counter()
    for name, spent in seconds.items():
        by_kind[kind_of(name)] += spent
    return Profile(
        wall_s=wall_s,
        busy_s=busy_us / 1e6,
        kernels=len(kernels),
        by_kind=dict(by_kind),
        top=[(name, spent, calls[name]) for name, spent in seconds.most_common(top)],
    )


def save(profile: Profile, out: Path, section: str, variant: str) -> Path:
    """The top kernels as a markdown table next to gpu.json."""
    slug = "".join(c if c.isalnum() else "-" for c in f"{section}-{variant}".lower())
    path = out / f"profile-{slug.strip('-')[:80]}.md"
    path.write_text(f"# {section}: {variant}\n\n{profile.line()}\n\n{profile.table()}")
    return path

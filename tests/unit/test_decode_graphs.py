"""The continuous decoder's step buckets: which shapes are captured, and how rows are padded."""

from __future__ import annotations

from typing import Any

import pytest

from hunyuan_service.models.decoding.graphs import PaddedStep, row_buckets, width_buckets


@pytest.mark.parametrize(
    ("max_rows", "buckets"),
    [(1, [1]), (2, [1, 2]), (4, [1, 2, 4]), (6, [1, 2, 4, 6]), (64, [1, 2, 4, 8, 16, 32, 64])],
)
def test_row_buckets_are_powers_of_two_and_the_maximum(max_rows: int, buckets: list[int]) -> None:
    assert row_buckets(max_rows) == buckets


def test_width_buckets_reach_the_capacity() -> None:
    assert width_buckets(100) == [256]
    assert width_buckets(256) == [256]
    assert width_buckets(1000) == [256, 512, 1024]


def steps(forward: Any = None, budget: int = 4096) -> PaddedStep:
    return PaddedStep(forward, 900, 8, 1000, budget, "cpu", capture=False)


def test_a_step_takes_the_smallest_bucket_that_holds_it() -> None:
    step = steps()
    assert step.bucket(1, 1) == (1, 256)
    assert step.bucket(3, 257) == (4, 512)
    assert step.bucket(8, 1000) is None  # 8 x 1024 is over the budget
    assert step.bucket(4, 1000) == (4, 1024)
    assert step.bucket(9, 1) is None  # more rows than MAX_BATCH_SIZE
    assert step.bucket(1, 1025) is None  # wider than the pool
    assert (8, 1024) not in step.buckets()
    assert (4, 1024) in step.buckets()


def test_padding_rows_sit_on_the_scratch_position_with_length_one() -> None:
    values = [[5, 6], [10, 20], [3, 4], [4, 5], [7, 16]]
    assert steps().padded(values, 4) == [
        [5, 6, 0, 0],
        [10, 20, 900, 900],
        [3, 4, 0, 0],
        [4, 5, 1, 1],
        [7, 16, 900, 900],
    ]


def test_a_step_runs_at_its_bucket_and_returns_only_the_real_rows() -> None:
    torch = pytest.importorskip("torch")
    calls: list[tuple[list[list[int]], int]] = []

    def forward(inputs: Any, width: int) -> Any:
        calls.append((inputs.tolist(), width))
        return inputs[0][:, None].to(torch.float32).expand(-1, 3)

    step = steps(forward)
    logits = step.run([[7, 8, 9], [1, 2, 3], [0, 0, 0], [1, 1, 1], [1, 2, 3]], 300)
    assert calls[0][1] == 512
    assert len(calls[0][0][0]) == 4
    assert logits.tolist() == [[7.0] * 3, [8.0] * 3, [9.0] * 3]
    assert (step.padded_steps, step.padded_rows, step.eager_steps) == (1, 1, 0)
    step.run([[1] * 8, [0] * 8, [0] * 8, [1] * 8, [0] * 8], 1000)  # past the budget: exact
    assert calls[1][1] == 1000
    assert len(calls[1][0][0]) == 8
    assert step.eager_steps == 1

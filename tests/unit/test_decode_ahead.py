"""DECODE_AHEAD's stop check: what generate's loop sees when it reads each step one step late."""

from __future__ import annotations

import pytest
import torch

from hunyuan_service.models.decode_ahead import StepAheadStopCheck, ahead_of_the_device


class Streamer:
    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def put(self, value: torch.Tensor) -> None:
        self.seen.append(value.tolist())


def check(max_length: int | None = None) -> tuple[StepAheadStopCheck, list[list[int]]]:
    streamer = Streamer()
    input_ids = torch.zeros((2, 5), dtype=torch.long)
    return StepAheadStopCheck(input_ids, max_length, None, False, streamer), streamer.seen


def step(
    stop_check: StepAheadStopCheck, unfinished: list[bool], tokens: list[int], length: int
) -> bool:
    return stop_check(torch.tensor(unfinished), torch.tensor(tokens), length)


def test_each_step_is_read_one_step_later_and_the_step_after_a_stop_is_undone() -> None:
    stop_check, streamed = check()
    assert step(stop_check, [True, True], [11, 21], 6) is False
    assert streamed == []  # nothing read yet: the device may still be on this step
    assert step(stop_check, [True, False], [12, 22], 7) is False
    assert streamed == [[11, 21]]
    assert step(stop_check, [False, False], [13, 0], 8) is False  # every row ends here...
    assert step(stop_check, [False, False], [0, 0], 9) is True  # ...which is seen one step on
    assert streamed == [[11, 21], [12, 22], [13, 0]]
    assert stop_check.finish() == 1  # generate drops the step that ran after the end
    assert streamed == [[11, 21], [12, 22], [13, 0]]  # and its tokens are never streamed


def test_reaching_the_length_limit_stops_at_once_and_streams_the_last_step() -> None:
    stop_check, streamed = check(max_length=8)
    assert step(stop_check, [True, True], [11, 21], 6) is False
    assert step(stop_check, [True, True], [12, 22], 7) is False
    assert step(stop_check, [True, True], [13, 23], 8) is True
    assert streamed == [[11, 21], [12, 22]]
    assert stop_check.finish() == 0
    assert streamed == [[11, 21], [12, 22], [13, 23]]


def test_only_calls_that_hand_back_no_cache_are_supported() -> None:
    assert StepAheadStopCheck.is_supported(torch.device("cuda"), None, False, False)
    assert not StepAheadStopCheck.is_supported(torch.device("cuda"), None, True, False)
    assert not StepAheadStopCheck.is_supported(torch.device("cpu"), None, False, True)


def test_the_check_is_swapped_in_for_the_block_only() -> None:
    from transformers.generation import utils as generation

    original = generation.DeferredStopCheck
    with ahead_of_the_device(False):
        assert generation.DeferredStopCheck is original

    def fails_inside() -> None:
        with ahead_of_the_device(True):
            assert generation.DeferredStopCheck is StepAheadStopCheck
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        fails_inside()
    assert generation.DeferredStopCheck is original

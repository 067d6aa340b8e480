"""Batching in the tiny real models: a row equals its solo run; rows keep their own settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from hunyuan_service.errors import JobCancelled
from hunyuan_service.models.base import JobContext
from hunyuan_service.models.types import ImageEdit
from tests.e2e.conftest import tiny_settings
from tests.images import png_bytes


class Row:
    """One row's job context: records its events; stops after `stop_after` progress events."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.progress: list[tuple[int, int]] = []
        self.tokens: list[str] = []
        self.stop_after = stop_after

    def context(self) -> JobContext:
        return JobContext(
            should_stop=lambda: (
                self.stop_after is not None and len(self.progress) >= self.stop_after
            ),
            on_progress=lambda step, total: self.progress.append((step, total)),
            on_token=self.tokens.append,
            stop_reason=lambda: "client_disconnected",
        )


@pytest.fixture(scope="module", params=["plain", "decode ahead"])
def qwen_any(request: pytest.FixtureRequest, qwen: Any, tiny_cache: Path) -> Any:
    """The tiny Qwen as loaded by default, then with DECODE_AHEAD: batches behave the same."""
    if request.param == "plain":
        return qwen
    from hunyuan_service.models.qwen_vl import QwenVLModel

    model = QwenVLModel(tiny_settings("image2text", tiny_cache, decode_ahead=True))
    model.load()
    return model


def pixels(output: Any) -> np.ndarray:
    return np.asarray(output.image, dtype=np.int16)


def test_flux_rows_equal_their_solo_images_and_a_stopped_row_is_dropped(flux: Any) -> None:
    from hunyuan_service.models.types import Text2ImageInput

    requests = [
        Text2ImageInput(prompt, 64, 64, num_inference_steps=3, seed=seed)
        for prompt, seed in (("a red fox", 1), ("a blue bird", 2), ("a cat", 3))
    ]
    assert len({flux.batch_key(r) for r in requests}) == 1
    solo = [flux.infer(r, JobContext()) for r in requests]
    rows = [Row(), Row(stop_after=1), Row()]
    batch = flux.infer_batch(requests, [row.context() for row in rows])
    assert isinstance(batch[1], JobCancelled)
    for i in (0, 2):
        assert batch[i].seed == requests[i].seed
        diff = np.abs(pixels(batch[i]) - pixels(solo[i])).max()
        assert diff <= 2, f"row {i} differs from its solo image by {diff}"
        assert rows[i].progress == [(1, 3), (2, 3), (3, 3)]  # each row hears every step
    assert not np.array_equal(pixels(batch[0]), pixels(batch[2]))  # its own seed and prompt


def test_flux_batches_only_alike_requests(flux: Any) -> None:
    from hunyuan_service.models.types import Text2ImageInput

    base = Text2ImageInput("x", 64, 64, num_inference_steps=3)
    assert flux.batch_key(base) == flux.batch_key(Text2ImageInput("y", 64, 64, 3, seed=9))
    assert flux.batch_key(base) != flux.batch_key(Text2ImageInput("x", 64, 128, 3))
    assert flux.batch_key(base) != flux.batch_key(Text2ImageInput("x", 64, 64, 4))
    assert flux.batch_key(Text2ImageInput("x", 64, 64, 3, count=2)) is None
    # Edits batch with edits of their kind and strength, never with plain generations.
    edit, inpaint = edit_inputs(3)[0], edit_inputs(3, masked=True)[0]
    assert flux.batch_key(edit) not in (None, flux.batch_key(base), flux.batch_key(inpaint))
    assert flux.batch_key(edit) == flux.batch_key(edit_inputs(3, seed=40)[1])
    weaker = Text2ImageInput("x", 64, 64, 3, edit=ImageEdit(edit.edit.image, 0.5))
    assert flux.batch_key(edit) != flux.batch_key(weaker)


def edit_inputs(count: int, masked: bool = False, seed: int = 10) -> list[Any]:
    """`count` edits of 64x64 pictures, each its own image (and mask), prompt and seed."""
    from PIL import Image

    from hunyuan_service.models.types import ImageEdit, Text2ImageInput

    inputs = []
    for i in range(count):
        image = Image.new("RGB", (64, 64), (40 * i, 200 - 40 * i, 90))
        mask = None
        if masked:
            mask = Image.new("L", (64, 64), 0)
            mask.paste(255, (8 * i, 8, 8 * i + 32, 40))  # each row repaints its own square
        edit = ImageEdit(image, strength=0.75, mask=mask)
        inputs.append(Text2ImageInput(f"picture {i}", 64, 64, 4, seed=seed + i, edit=edit))
    return inputs


@pytest.mark.parametrize("masked", [False, True], ids=["image-to-image", "inpainting"])
def test_flux_edit_rows_equal_their_solo_edits(flux: Any, masked: bool) -> None:
    requests = edit_inputs(3, masked)
    assert len({flux.batch_key(r) for r in requests}) == 1
    solo = [flux.infer(r, JobContext()) for r in requests]
    rows = [Row(), Row(), Row()]
    batch = flux.infer_batch(requests, [row.context() for row in rows])
    for i, (alone, together) in enumerate(zip(solo, batch, strict=True)):
        diff = np.abs(pixels(together) - pixels(alone)).max()
        assert diff <= 2, f"row {i} differs from its solo edit by {diff}"
        assert rows[i].progress == [(1, 3), (2, 3), (3, 3)]  # 0.75 of 4 steps run
        if masked:  # every pixel outside the row's own mask is its own input's
            keep = np.asarray(requests[i].edit.mask) == 0
            sent = np.asarray(requests[i].edit.image, dtype=np.int16)
            assert np.array_equal(pixels(together)[keep], sent[keep])
    assert not np.array_equal(pixels(batch[0]), pixels(batch[1]))


def test_qwen_rows_equal_their_solo_answers_with_their_own_limits(qwen_any: Any) -> None:
    from hunyuan_service.media import decode_image
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    image = decode_image(png_bytes(), "images[0]", qwen_any.settings)
    requests = [
        Image2TextInput((ChatMessage("user", "Hi"),), max_new_tokens=3),
        Image2TextInput((ChatMessage("user", "Describe this picture", (image,)),), 6),
        Image2TextInput((ChatMessage("user", "A much longer question, with more words"),), 5),
    ]
    assert len({qwen_any.batch_key(r) for r in requests}) == 1
    solo = [qwen_any.infer(r, JobContext()) for r in requests]
    rows = [Row() for _ in requests]
    batch = qwen_any.infer_batch(requests, [row.context() for row in rows])
    for i, (alone, together) in enumerate(zip(solo, batch, strict=True)):
        assert together.prompt_tokens == alone.prompt_tokens, i
        assert together.completion_tokens == alone.completion_tokens, i
        assert together.completion_tokens <= requests[i].max_new_tokens
        assert together.text == alone.text, i
        assert together.finish_reason == alone.finish_reason, i
        assert "".join(rows[i].tokens) == together.text  # each row streams only its own text


def test_qwen_rows_follow_their_own_grammar_or_none(qwen_any: Any) -> None:
    from hunyuan_service.models.grammar import compile_response_format
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    schemas = [
        {"type": "array", "items": {"enum": ["cat", "dog"]}, "minItems": 1, "maxItems": 3},
        None,
        {
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["n"],
            "additionalProperties": False,
        },
    ]
    requests = [
        Image2TextInput(
            (ChatMessage("user", f"question {i}"),),
            max_new_tokens=60,
            grammar=None if schema is None else compile_response_format("json_schema", schema, "s"),
        )
        for i, schema in enumerate(schemas)
    ]
    assert len({qwen_any.batch_key(r) for r in requests}) == 1  # a grammar does not split a batch
    solo = [qwen_any.infer(r, JobContext()) for r in requests]
    batch = qwen_any.infer_batch(requests, [Row().context() for _ in requests])
    assert [row.text for row in batch] == [alone.text for alone in solo]
    for schema, row in zip(schemas, batch, strict=True):
        if schema is not None:
            assert row.finish_reason == "stop"
            jsonschema.validate(json.loads(row.text), schema)
    with pytest.raises(ValueError, match="Expecting"):  # the free row: junk, not JSON
        json.loads(batch[1].text)


def test_qwen_cancelled_row_stops_while_its_neighbours_finish(qwen_any: Any) -> None:
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    requests = [Image2TextInput((ChatMessage("user", f"question {i}"),), 8) for i in range(3)]
    solo = [qwen_any.infer(r, JobContext()) for r in requests]
    assert solo[1].completion_tokens == 8  # alone, row 1 would run to its limit
    rows = [Row() for _ in requests]
    contexts = [row.context() for row in rows]
    # Row 1 stops once row 0 has streamed its first piece of text.
    contexts[1] = JobContext(
        should_stop=lambda: bool(rows[0].tokens),
        on_token=rows[1].tokens.append,
        stop_reason=lambda: "client_disconnected",
    )
    batch = qwen_any.infer_batch(requests, contexts)
    assert isinstance(batch[1], JobCancelled)
    assert [batch[0].text, batch[2].text] == [solo[0].text, solo[2].text]
    # Its row stopped within a token or two, not at its limit: it streamed far less text.
    assert len("".join(rows[1].tokens)) < len(solo[1].text)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ({"temperature": 0.0}, {"temperature": 0.0, "max_new_tokens": 9}, True),
        ({"temperature": 0.7, "top_p": 0.9}, {"temperature": 0.7, "top_p": 0.9}, True),
        ({"temperature": 0.7}, {"temperature": 0.8}, False),
        ({"temperature": 0.0}, {"temperature": 0.0, "repetition_penalty": 1.1}, False),
    ],
)
def test_qwen_batch_keys(qwen: Any, a: dict, b: dict, same: bool) -> None:
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    message = (ChatMessage("user", "x"),)
    key_a = qwen.batch_key(Image2TextInput(message, **a))
    key_b = qwen.batch_key(Image2TextInput(message, **b))
    assert (key_a == key_b) is same
    assert qwen.batch_key(Image2TextInput(message, temperature=0.7, seed=3)) is None
    assert qwen.batch_key(Image2TextInput(message, stop=("x",))) is None

"""Cancellation inside the real pipelines: FLUX stops at a step, Qwen2.5-VL at a token."""

from __future__ import annotations

from typing import Any

import pytest

from hunyuan_service.errors import JobCancelled
from hunyuan_service.models.base import JobContext
from tests.images import png_bytes


class StopAfter:
    """A job context that asks the model to stop after `limit` events of `kind`."""

    def __init__(self, kind: str, limit: int) -> None:
        self.kind, self.limit = kind, limit
        self.events: list[tuple[str, dict[str, Any]]] = []

    def context(self) -> JobContext:
        return JobContext(
            should_stop=lambda: sum(e == self.kind for e, _ in self.events) >= self.limit,
            on_progress=lambda step, total: self.events.append(
                ("progress", {"step": step, "total": total})
            ),
            on_token=lambda text: self.events.append(("token", {"text": text})),
            stop_reason=lambda: "client_disconnected",
        )


def test_flux_reports_every_step(flux: Any) -> None:
    from hunyuan_service.models.types import Text2ImageInput

    stop = StopAfter("progress", 10_000)
    output = flux.infer(
        Text2ImageInput("a fox", 64, 64, num_inference_steps=6, seed=1), stop.context()
    )
    assert [d["step"] for _, d in stop.events] == [1, 2, 3, 4, 5, 6]
    assert {d["total"] for _, d in stop.events} == {6}
    assert output.image.size == (64, 64)


def test_flux_stops_at_the_next_step_and_skips_the_decode(flux: Any, monkeypatch: Any) -> None:
    from hunyuan_service.models.types import Text2ImageInput

    decodes: list[int] = []
    original = flux.pipe.vae.decode

    def counted_decode(*args: Any, **kwargs: Any) -> Any:
        decodes.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(flux.pipe.vae, "decode", counted_decode)
    stop = StopAfter("progress", 2)
    with pytest.raises(JobCancelled):
        flux.infer(Text2ImageInput("a fox", 64, 64, num_inference_steps=50), stop.context())
    assert len(stop.events) == 2
    assert decodes == []


def test_qwen_streams_tokens_and_stops_at_the_next_token(qwen: Any) -> None:
    from hunyuan_service.media import decode_image
    from hunyuan_service.models.types import ChatMessage, Image2TextInput

    image = decode_image(png_bytes(), "images[0]", qwen.settings)
    request = Image2TextInput(
        messages=(ChatMessage("user", "Describe", (image,)),), max_new_tokens=40
    )
    free = StopAfter("token", 10_000)
    output = qwen.infer(request, free.context())
    assert len(free.events) > 3  # long enough that stopping after 3 is a real interruption
    streamed = "".join(d["text"] for _, d in free.events)
    assert streamed == output.text
    stop = StopAfter("token", 3)
    with pytest.raises(JobCancelled):
        qwen.infer(request, stop.context())
    assert len(stop.events) <= 4

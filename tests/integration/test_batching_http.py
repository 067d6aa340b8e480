"""Batching over real HTTP with a fake batching model: each client gets its own answer."""

from __future__ import annotations

from typing import Any

import httpx

from tests.fakes import BatchingModel
from tests.integration.live import (
    counter,
    post_in_background,
    wait_until,
)
from tests.metrics import value
from tests.sse import parse_sse


class BatchingImageModel(BatchingModel):
    """Batches text2image requests of the same size; answers each with an image of its size."""

    def batch_key(self, request: Any) -> Any:
        return (request.width, request.height)

    def infer_batch(self, requests: list[Any], contexts: list[Any]) -> list[Any]:
        from PIL import Image

        from hunyuan_service.models.types import Text2ImageOutput

        rows = [{"id": r.prompt, "key": self.batch_key(r)} for r in requests]
        outputs = super().infer_batch(rows, contexts)
        return [
            out
            if isinstance(out, BaseException)
            else Text2ImageOutput((Image.new("RGB", (r.width, r.height)),), r.seed or 0, 1)
            for r, out in zip(requests, outputs, strict=True)
        ]


def batch_size_sum_and_count(url: str) -> tuple[float, int]:
    text = httpx.get(f"{url}/metrics").text
    return value(text, "hunyuan_batch_size_sum"), int(value(text, "hunyuan_batch_size_count"))


def test_queued_requests_of_one_size_are_served_in_one_batch(serve: Any) -> None:
    model = BatchingImageModel()
    model.release.clear()
    url = serve(model, max_batch_size=4, max_queue_size=8)
    results: dict = {}
    threads = [post_in_background(url, {"prompt": "head", "width": 128, "height": 64}, results, 9)]
    wait_until(lambda: model.started.is_set())
    for i in range(3):
        body = {"prompt": f"p{i}", "width": 64, "height": 64, "seed": i}
        threads.append(post_in_background(url, body, results, i))
        wait_until(lambda i=i: counter(url, "admitted") == i + 2)
    model.release.set()
    for thread in threads:
        thread.join()
    assert [results[i].status_code for i in (9, 0, 1, 2)] == [200] * 4
    assert [results[i].json()["seed"] for i in range(3)] == [0, 1, 2]
    assert [results[i].json()["width"] for i in (9, 0)] == [128, 64]
    assert model.batches == [["head"], ["p0", "p1", "p2"]]
    assert batch_size_sum_and_count(url) == (4.0, 2)


def test_each_streamed_row_gets_only_its_own_events(serve: Any) -> None:
    model = BatchingImageModel(steps=3)
    model.release.clear()
    url = serve(model, max_batch_size=4)
    results: dict = {}
    head = post_in_background(url, {"prompt": "head", "width": 128, "height": 64}, results, 9)
    wait_until(lambda: model.started.is_set())
    streams: dict[int, list[Any]] = {}

    def stream(row: int) -> None:
        body = {"prompt": f"s{row}", "width": 64, "height": 64, "stream": True}
        with httpx.stream("POST", f"{url}/infer", json=body, timeout=60) as response:
            streams[row] = parse_sse("".join(response.iter_text()))

    import threading

    threads = []
    for row in range(2):
        threads.append(threading.Thread(target=stream, args=(row,)))
        threads[-1].start()
        wait_until(lambda row=row: counter(url, "admitted") == row + 2)
    model.release.set()
    for thread in [head, *threads]:
        thread.join()
    assert model.batches == [["head"], ["s0", "s1"]]
    for row in range(2):
        totals = {data["total"] for name, data in streams[row] if name == "progress"}
        assert totals == {100 + row}  # the fake tags each row's progress with its place
        assert streams[row][-1][0] == "result"

"""Least-recently-used caches of tensors by key, bounded by bytes; /metrics reports each one.

A model keeps work that depends only on part of a request (a prompt's text embeddings) and
reuses it when that part repeats. Only the model thread reads and writes a cache; /metrics reads
its counters from the event loop (plain integers, each written whole).
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from typing import Any


def tensor_bytes(value: Any) -> int:
    """Bytes held by a tensor, or by the tensors of a tuple or list."""
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(item) for item in value)
    return int(value.numel() * value.element_size())


class TensorCache:
    """Values by key, least recently used first out once `max_bytes` is passed.

    A value larger than the whole cap is not kept. `max_bytes=0` turns the cache off: every
    lookup misses and nothing is kept.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[Hashable, tuple[Any, int]] = (
            collections.OrderedDict()
        )
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = tensor_bytes(value)
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _key, (_value, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
            self.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "bytes": self.bytes,
            "entries": len(self._entries),
        }

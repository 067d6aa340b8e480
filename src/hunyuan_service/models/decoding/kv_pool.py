"""The continuous decoder's KV cache: one pool of token positions per layer, rows hold ranges.

Each row reserves one contiguous range of `prompt + max_new_tokens` positions when it joins and
frees it when it leaves, so memory follows what the rows need rather than a fixed length for
every row. A row that does not fit waits for rows to leave (the decoder never fails a running
row for room). Keys and values keep their own KV heads: attention reads them with grouped-query
attention, never repeated to the query heads. One position past `capacity`, never reserved, is
the scratch slot that the padding rows of a captured step write to and read from.
"""

from __future__ import annotations

import bisect
from typing import Any


class KVPool:
    """`capacity` positions of keys and values for each of `layers` layers: `layers[n]` is
    layer n's [2 (keys, values), kv_heads, capacity + 1, head_dim].

    Args:
        layers, kv_heads, head_dim: the text model's shape.
        capacity: positions in all, shared by the rows.
        device, dtype: where and in what the keys and values live.
    """

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, capacity: int, device: Any, dtype: Any
    ) -> None:
        import torch

        self.capacity = capacity
        self.scratch = capacity  # the padding rows' position
        # Keys (0) and values (1) of a layer in one tensor, so that a step writes both with one
        # kernel and reads both with another.
        shape = (2, kv_heads, capacity + 1, head_dim)
        self.layers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (start, length), sorted by start

    @property
    def free_positions(self) -> int:
        return sum(length for _start, length in self._free)

    def reserve(self, length: int) -> int | None:
        """The start of a free range of `length` positions (first fit), or None if none is."""
        for index, (start, free) in enumerate(self._free):
            if free >= length:
                if free == length:
                    del self._free[index]
                else:
                    self._free[index] = (start + length, free - length)
                return start
        return None

    def release(self, start: int, length: int) -> None:
        """Gives a range back, merging it with free neighbours."""
        index = bisect.bisect_left(self._free, (start, 0))
        self._free.insert(index, (start, length))
        merged: list[tuple[int, int]] = []
        for begin, size in self._free:
            if merged and merged[-1][0] + merged[-1][1] == begin:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((begin, size))
        self._free = merged

    def write(self, layer: int, start: int, keys: Any, values: Any) -> None:
        """Stores `[kv_heads, n, head_dim]` keys and values at positions start..start+n."""
        count = keys.shape[1]
        self.layers[layer][0, :, start : start + count] = keys
        self.layers[layer][1, :, start : start + count] = values

"""KV layouts of a decode batch: where its rows' caches live between steps.

``Merged``: mlx-lm's ``BatchKVCache`` (rows left-padded to the longest; a
joining row is merged in, a leaving one extracted), or one row's plain cache.
``Ragged``: rows in segments, each with its own cache (rows that join
together share one), and each step one packed pass (packed.py) that prompt
chunks can ride along in: a row of a very different length pads and copies
nothing. Ragged where ``packed.mixable`` allows it. Spec: "Batching".
"""

from __future__ import annotations

import os
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from . import packed, runner
from .request import Request

# Bench switch (read once): MLX_WORKER_PACKED=0 keeps every batch Merged.
PACKED = os.environ.get("MLX_WORKER_PACKED", "1") != "0"
# A joining row may be merged into an older segment this small (rows x depth):
# the copy is cheap, and one segment steps as mlx-lm's own batch.
SMALL_SEGMENT_TOKENS = 4096


def ragged(model) -> bool:
    """Whether this model's decode batch is ``Ragged`` (a text model's only:
    a vision model's rows carry their own positions, vision/lm.py)."""
    return PACKED and not hasattr(model, "begin_batch") and packed.mixable(model)


def for_model(model, batchable: bool) -> "Merged | Ragged":
    return Ragged() if batchable and ragged(model) else Merged()


class Merged:
    packs = False  # no prompt chunk rides along in its step

    def __init__(self) -> None:
        self.cache: Optional[list] = None  # plain (one row) or BatchKVCache layers

    def add(self, cache: list, rows: int) -> None:
        """A row's own cache joins the ``rows`` already here."""
        if rows == 0:
            self.cache = cache
            return
        if rows == 1:
            self.cache = [BatchKVCache.merge([c]) for c in self.cache]
        for layer, c in zip(self.cache, cache):
            layer.extend(BatchKVCache.merge([c]))

    def own(self, i: int, rows: int) -> list:
        """Row i's KV as plain per-request caches."""
        if rows == 1:
            return self.cache
        return [layer.extract(i) for layer in self.cache]

    def keep(self, keep: list[int]) -> None:
        if not keep:
            self.cache = None
        elif isinstance(self.cache[0], BatchKVCache):
            if len(keep) == 1:  # back to the lone-stream path
                self.cache = [layer.extract(keep[0]) for layer in self.cache]
            else:
                index = mx.array(keep)
                for layer in self.cache:
                    layer.filter(index)

    def layers(self) -> list:
        return self.cache or []

    def forward(self, model, y: mx.array, lone: Optional[Request], embedding: Optional[mx.array],
                chunks: Optional[list[tuple[Request, int]]]) -> mx.array:
        return runner.decode(model, y, self.cache, lone, embedding)


class Ragged:
    """Rows in segments, each with its own cache layers: one row's plain
    ones, or a BatchKVCache shared by rows at about the same depth that
    joined together or while it was small (so a batch that starts together
    steps as one, and a row of a different depth pads and copies nothing)."""

    packs = True

    def __init__(self) -> None:
        self.segments: list[list] = []  # cache layers, in row order
        self.sizes: list[int] = []  # rows in each segment
        self.fresh = False  # the last segment was made since the last step

    def add(self, cache: list, rows: int) -> None:
        if self.segments and self._joins_last(cache):
            last = self.segments[-1]
            if not isinstance(last[0], BatchKVCache):  # (a shared one may be down to one row)
                last = self.segments[-1] = [BatchKVCache.merge([c]) for c in last]
            for layer, c in zip(last, cache):
                layer.extend(BatchKVCache.merge([c]))
            self.sizes[-1] += 1
            return
        self.segments.append(cache)
        self.sizes.append(1)
        self.fresh = True

    def _joins_last(self, cache: list) -> bool:
        """A row shares the last segment when their depths are close and
        merging copies little: that segment was made this step, or is small."""
        last = self.segments[-1]
        small = self.sizes[-1] * _depth(last) <= SMALL_SEGMENT_TOKENS
        return (self.fresh or small) and _close(_depth(last), _depth(cache))

    def _where(self, i: int) -> tuple[int, int]:
        for k, size in enumerate(self.sizes):
            if i < size:
                return k, i
            i -= size
        raise IndexError(i)

    def own(self, i: int, rows: int) -> list:
        k, j = self._where(i)
        segment = self.segments[k]
        return [layer.extract(j) for layer in segment] if isinstance(segment[0], BatchKVCache) else segment

    def keep(self, keep: list[int]) -> None:
        kept = set(keep)
        segments, sizes, start = [], [], 0
        for segment, size in zip(self.segments, self.sizes):
            js = [j for j in range(size) if start + j in kept]
            start += size
            if not js:
                continue
            if len(js) < size:
                index = mx.array(js)
                for layer in segment:
                    layer.filter(index)
            segments.append(segment)
            sizes.append(len(js))
        # the segment made this step may have left: the new last one isn't fresh
        self.fresh = self.fresh and bool(segments) and segments[-1] is self.segments[-1]
        self.segments, self.sizes = segments, sizes

    def layers(self) -> list:
        return [layer for segment in self.segments for layer in segment]

    def forward(self, model, y: mx.array, lone: Optional[Request], embedding: Optional[mx.array],
                chunks: Optional[list[tuple[Request, int]]]) -> mx.array:
        self.fresh = False
        if not chunks and len(self.segments) == 1:  # one cache: mlx-lm's own step
            return runner.decode(model, y, self.segments[0], None, None)
        return runner.decode_packed(model, y, list(zip(self.sizes, self.segments)), chunks)


def _depth(cache: list) -> int:
    layer = cache[0]
    return layer._idx if isinstance(layer, BatchKVCache) else layer.offset


def _close(a: int, b: int) -> bool:
    """Depths close enough to share a segment: padding stays small."""
    return abs(a - b) <= max(32, min(a, b) // 4)

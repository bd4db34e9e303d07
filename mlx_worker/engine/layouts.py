"""KV layouts of a decode batch: where its rows' caches live between steps.

``Merged``: mlx-lm's ``BatchKVCache`` (rows left-padded to the longest; a
joining row is merged in, a leaving one extracted), or one row's plain cache.
``Ragged``: every row keeps its own plain cache and each step is one packed
pass (packed.py) that a prompt chunk can ride along in: nothing is padded or
copied when rows of very different lengths join. Ragged is used where
``packed.mixable`` says the model allows it. Spec: "Batching".
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
                chunk: Optional[tuple[Request, int]]) -> mx.array:
        return runner.decode(model, y, self.cache, lone, embedding)


class Ragged:
    packs = True

    def __init__(self) -> None:
        self.caches: list[list] = []  # each row's own cache layers

    def add(self, cache: list, rows: int) -> None:
        self.caches.append(cache)

    def own(self, i: int, rows: int) -> list:
        return self.caches[i]

    def keep(self, keep: list[int]) -> None:
        self.caches = [self.caches[i] for i in keep]

    def layers(self) -> list:
        return [layer for cache in self.caches for layer in cache]

    def forward(self, model, y: mx.array, lone: Optional[Request], embedding: Optional[mx.array],
                chunk: Optional[tuple[Request, int]]) -> mx.array:
        if chunk is None and len(self.caches) == 1:  # exactly mlx-lm's generate_step
            return runner.decode(model, y, self.caches[0], None, None)
        return runner.decode_packed(model, y, self.caches, chunk)

"""An image tower's work in pieces, so decoding streams step between them.

Building a request's input embeddings only builds MLX's lazy graph; the
tower's blocks are marked (``mark``) so that building it also records each
block's output. Evaluating those outputs one at a time (``Pieces.run``) runs
the tower block by block, between decode steps, instead of in one stall.
Spec: "Batching". ``MLX_WORKER_TOWER_PIECES=0``: the tower runs in one go.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger("mlx_worker.vision.tower_pieces")

ENABLED = os.environ.get("MLX_WORKER_TOWER_PIECES", "1") != "0"
# Where mlx-vlm models keep their image tower.
TOWERS = ("vision_tower", "vision_model", "visual", "vision_encoder")

_current: Optional["Pieces"] = None  # where marked blocks record their outputs, while a graph is built
_subclasses: dict = {}


def mark(vlm: nn.Module) -> int:
    """Mark the blocks of ``vlm``'s image tower (its longest list of
    modules) whose output the model uses. Each block's class becomes a
    subclass that records its output; parameters and their names are
    untouched. Returns how many."""
    tower = next((getattr(vlm, name) for name in TOWERS if isinstance(getattr(vlm, name, None), nn.Module)), None)
    blocks = _longest_list(tower) if tower is not None else []
    # Blocks after the hidden state the projector reads are never evaluated
    # unless recorded (LLaVA's vision_feature_layer -2 leaves the last one).
    blocks = blocks[: len(blocks) - _unread_tail(vlm)]
    for block in blocks:
        block.__class__ = _recording_class(type(block))
    log.debug("tower blocks marked: %d", len(blocks))
    return len(blocks)


def _unread_tail(vlm: nn.Module) -> int:
    """How many last tower blocks no output of the model reads: a LLaVA-style
    ``vision_feature_layer`` of -k (or the least deep of several) leaves k - 1."""
    layer = getattr(vlm, "vision_feature_layer", None)
    layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not layers or not all(isinstance(i, int) and i < 0 for i in layers):
        return 0
    return min(-i for i in layers) - 1


def _longest_list(module: nn.Module) -> list:
    """Its longest list of blocks: modules made of modules (a projector's
    list of layers, Linear and activation, is not one)."""
    best: list = []
    for child in module.children().values():
        if isinstance(child, list) and child and all(_composite(c) for c in child):
            found = child
        elif isinstance(child, nn.Module):
            found = _longest_list(child)
        else:
            continue
        if len(found) > len(best):
            best = found
    return best


def _composite(m) -> bool:
    return isinstance(m, nn.Module) and any(
        isinstance(c, nn.Module) or (isinstance(c, list) and c) for c in m.children().values())


def _recording_class(cls: type) -> type:
    if getattr(cls, "_records", False):
        return cls
    if cls not in _subclasses:
        def __call__(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            if _current is not None:
                first = out[0] if isinstance(out, (tuple, list)) else out
                if isinstance(first, mx.array):
                    _current.arrays.append(first)
            return out

        _subclasses[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_records": True})
    return _subclasses[cls]


@contextlib.contextmanager
def recording():
    """Collect the marked blocks' outputs of the graphs built meanwhile.
    Nested, the inner pieces (and their hooks) also go to the outer ones."""
    global _current
    pieces = Pieces([])
    if not ENABLED:  # the bench switch: the tower runs with the first prompt chunk
        yield pieces
        return
    before, _current = _current, pieces
    try:
        yield pieces
    finally:
        _current = before
        if before is not None:
            before.share(pieces.arrays, pieces.done, pieces.failed)


def share(arrays: list, done=None, failed=None) -> None:
    """Another request's pieces still to compute (features it is building)
    become pieces of the graphs built now too: whichever runs one first."""
    if _current is not None:
        _current.share(arrays, [done] if done else [], [failed] if failed else [])


class Pieces:
    """A prompt's tower outputs still to compute, in order, and what to call
    once they all ran (``done``) or one failed (``failed``)."""

    def __init__(self, arrays: list):
        self.arrays = arrays
        self.done: list = []
        self.failed: list = []

    def __bool__(self) -> bool:
        return bool(self.arrays)

    def share(self, arrays: list, done: list, failed: list) -> None:
        self.arrays.extend(arrays)
        self.done.extend(done)
        self.failed.extend(failed)

    def run(self, budget_s: float) -> int:
        """Compute pieces for about ``budget_s`` (at least one; all of them
        when the budget is infinite). Returns how many ran."""
        start, ran = time.perf_counter(), 0
        while self.arrays:
            try:
                mx.eval(self.arrays.pop(0))
            except BaseException:
                for hook in self.failed:
                    hook()
                raise
            ran += 1
            if time.perf_counter() - start >= budget_s:
                break
        if not self.arrays:
            for hook in self.done:
                hook()
            self.done.clear()
        return ran

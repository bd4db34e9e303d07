"""Checkpoints: a cache's untrimmable state at one position, kept so that a
later prompt sharing only part of a stored conversation can still resume.

Plain KV layers are cut back when a checkpoint is used, never copied; what
can't be cut back is copied (recurrent state, a sliding window's KV). For a
hybrid model a checkpoint is the recurrent states at position P; using it
gives them plus the full-attention KV trimmed to P.
Spec: protocol/README.md § Rotating caches and other untrimmable state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import CacheList, ChunkedKVCache, ConcatenateKVCache, KVCache, QuantizedKVCache

# A request holds at most this many while it runs: where it resumed, its
# system prompt's end, its last prefill chunk's end, its prompt's end
# (memory.generate_need counts them).
PER_REQUEST = 4

# Layers whose trim() cuts them back to any earlier position, by class name:
# mlx-vlm has its own copies of mlx-lm's cache classes.
_CUTTABLE = {cls.__name__ for cls in (KVCache, QuantizedKVCache, ConcatenateKVCache, ChunkedKVCache)}


def _cuttable(c) -> bool:
    return type(c).__name__ in _CUTTABLE


def _is_group(c) -> bool:
    return type(c).__name__ == CacheList.__name__ and hasattr(c, "caches")


@dataclass
class Checkpoint:
    pos: int  # tokens the state has seen
    layers: list  # per leaf layer: its copied state, or None (cut from the entry's own cache)
    nbytes: int


def leaves(cache: list) -> list:
    """The cache's layers, ``CacheList`` groups flattened, in a fixed order."""
    out = []
    for c in cache:
        if _is_group(c):
            out.extend(leaves(list(c.caches)))
        else:
            out.append(c)
    return out


def needs_checkpoints(cache: list) -> bool:
    """Whether some layer can't be cut back (recurrent state or a window)."""
    return not all(_cuttable(c) for c in leaves(cache))


def take(cache: list, pos: int) -> Checkpoint:
    """A checkpoint of ``cache``, which has seen ``pos`` tokens. The copies
    share no buffer with the live cache, so they cost what they count."""
    layers = [None if _cuttable(c) else _copy(c) for c in leaves(cache)]
    return Checkpoint(pos, layers, sum(layer_nbytes(c) for c in layers if c is not None))


def restore(own: list, cp: Checkpoint) -> list:
    """A fresh cache at ``cp.pos``: the copied layers from ``cp``, the plain
    KV layers cut from ``own`` (the entry's cache, which holds at least
    ``cp.pos`` tokens of the same prefix). ``own`` is not changed."""
    it = iter(cp.layers)

    def build(layers: list) -> list:
        out = []
        for c in layers:
            if _is_group(c):
                out.append(type(c)(*build(list(c.caches))))
                continue
            saved = next(it)
            if saved is not None:
                out.append(copy.deepcopy(saved))  # shares the buffers until written (copy on write)
            else:
                out.append(_cut(c, cp.pos))
        return out

    return build(own)


def layer_nbytes(c) -> int:
    try:
        return int(c.nbytes)
    except (NotImplementedError, AttributeError):
        return sum(getattr(v, "nbytes", 0) for _, v in tree_flatten(c.state))


def _cut(c, pos: int):
    c = copy.deepcopy(c)
    offset = getattr(c, "offset", None)
    if isinstance(offset, int) and offset > pos:
        c.trim(offset - pos)
    if type(c).__name__ == "KVCache" and c.keys is not None and c.keys.shape[2] > c.offset:
        c.keys, c.values = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
    return c


def _copy(c):
    if type(c).__name__ == "RotatingKVCache" and hasattr(c, "_temporal_order"):
        return _copy_window(c)
    out = copy.deepcopy(c)
    arrays = getattr(out, "cache", None)  # ArraysCache and kin: fresh buffers (a state may be a view)
    if isinstance(arrays, list):
        out.cache = [mx.array(a) if isinstance(a, mx.array) else a for a in arrays]
    return out


def _copy_window(c):
    """The window's tokens in temporal order, at most ``max_size`` of them
    (the first ``keep`` and the latest), copied out of the live buffer (a
    prefill chunk leaves it ``max_size - 1 + chunk`` tokens long)."""
    out = type(c)(max_size=c.max_size, keep=c.keep)
    out.offset = c.offset
    if c.keys is None:
        return out
    keys, values = (c._temporal_order(v) for v in (c.keys, c.values))
    held = min(c.offset, keys.shape[2])
    keys, values = keys[..., :held, :], values[..., :held, :]
    if held > c.max_size:
        tail = c.max_size - c.keep
        keys, values = (mx.concatenate([v[..., : c.keep, :], v[..., -tail:, :]], axis=2) if c.keep
                        else v[..., -tail:, :] for v in (keys, values))
    out.keys, out.values = mx.array(keys), mx.array(values)
    out._idx = out.keys.shape[2]
    mx.eval(out.keys, out.values)
    return out


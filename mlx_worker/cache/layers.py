"""A KV cache's layers: building one for a model, and what it holds.

The prompt cache's entries and leases, and the engine, measure caches with
these (spec: protocol/README.md § Prompt cache).
"""

from __future__ import annotations

from typing import Optional

from mlx_lm.models.cache import CacheList, KVCache, QuantizedKVCache, RotatingKVCache, make_prompt_cache

from .kv_quant import quantize_layers

DEFAULT_KEEP = 4  # mlx-lm's own: the first tokens a rotating cache never evicts


def make_cache(lm, keep: int = DEFAULT_KEEP) -> list:
    """A fresh cache for ``lm``: the model's own layout, with plain KV layers
    made rotating when the model was loaded with ``max_kv_size``.

    (mlx-lm's ``make_prompt_cache`` ignores ``max_kv_size`` for every model
    that defines ``make_cache``, Llama included.) With ``kv_bits`` the
    plain KV layers are quantized from the first token (kv_quant.py)."""
    cache = quantize_layers(make_prompt_cache(lm.model), lm.kv_quant)
    if lm.max_kv_size:
        cache = [
            RotatingKVCache(max_size=lm.max_kv_size, keep=keep) if type(c) is KVCache else c
            for c in cache
        ]
    return cache



def rotating_keep(max_kv_size: Optional[int], system_tokens: int) -> int:
    """How many leading tokens a rotating cache keeps when it wraps: a chat's
    system prompt (``system_tokens``, at most half the window); mlx-lm's 4
    otherwise. The cached and the uncached path both use it, so it never
    makes them differ."""
    if not max_kv_size:
        return DEFAULT_KEEP
    return max(0, min(max(DEFAULT_KEEP, system_tokens), max_kv_size // 2))


def _layers(cache: list):
    for c in cache:
        if isinstance(c, CacheList):
            yield from _layers(list(c.caches))
        else:
            yield c


def cache_offset(cache: list) -> Optional[int]:
    """Tokens the cache has seen; None when no layer counts them."""
    for c in _layers(cache):
        offset = getattr(c, "offset", None)
        if isinstance(offset, int):
            return offset
    return None


def cache_window(cache: list) -> Optional[int]:
    """The smallest rotating window that keeps leading tokens (``max_kv_size``'s):
    once wrapped, its results depend on the prefill chunking. None if no
    layer has one (a model's own sliding windows keep nothing: any
    chunking gives their result, so checkpoints serve them)."""
    sizes = [c.max_size for c in _layers(cache) if isinstance(c, RotatingKVCache) and c.keep > 0]
    return min(sizes) if sizes else None


def cache_nbytes(cache: list) -> int:
    total = 0
    for c in cache:
        try:
            total += c.nbytes
        except (NotImplementedError, AttributeError):
            from mlx.utils import tree_flatten

            total += sum(getattr(v, "nbytes", 0) for _, v in tree_flatten(c.state))
    return total


def compact(cache: list) -> list:
    """Plain KV layers cut to the tokens they hold (their buffers grow in
    256-token steps and keep trimmed tokens). The cut shares the buffer; the
    layer's next write copies only those tokens, not the whole buffer."""
    out = []
    for c in cache:
        if type(c) is KVCache and c.keys is not None and c.keys.shape[2] > c.offset:
            cut = KVCache()
            cut.keys, cut.values = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
            cut.offset = c.offset
            c = cut
        elif type(c) is QuantizedKVCache and c.keys is not None and c.keys[0].shape[2] > c.offset:
            cut = QuantizedKVCache(c.group_size, c.bits)
            cut.keys, cut.values = (tuple(x[..., : c.offset, :] for x in kv) for kv in (c.keys, c.values))
            cut.offset = c.offset
            c = cut
        out.append(c)
    return out


def common_prefix(a: list, b: list, limit: int) -> int:
    """Length of the common prefix of a and b, at most ``limit``. Elements
    are compared with ==, so image hashes in a vision key work too. List
    slices compare in C: a binary search beats a Python loop by far."""
    n = min(len(a), len(b), limit)
    if n <= 0 or a[:n] == b[:n]:
        return max(n, 0)
    lo, hi = 0, n  # a[:lo] == b[:lo]; a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo

"""Packed passes: several sequences' new tokens through a model in one forward pass.

The sequences' tokens (a prompt chunk, each decoding row's one token) lie end
to end in one row, so every matrix product runs once over all of them; only
attention is per sequence, each against its own plain KV cache (no padding,
no merge copies). A ``Layer`` stands in for each layer's cache; ``mixable``
wraps the model's RoPE and attention to split by sequence, and checks the
result against separate passes once. Spec: "Batching".
"""

from __future__ import annotations

import logging
import sys

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import base
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

from .. import errors, faults
from . import packed_attention

log = logging.getLogger("mlx_worker.engine.packed")

_ORIGINAL_SDPA = base.scaled_dot_product_attention
_FLAG = "_mlx_worker_packs"  # set on the model object: a later model at the same address asks again


class Pass:
    """One packed pass: its segments' spans of the row, in order. A segment
    is a prompt chunk (one sequence, ``n`` tokens) or decoding rows (``b``
    sequences, one token each, sharing one cache: a plain one when b is 1,
    mlx-lm's BatchKVCache otherwise); chunks come first (a one-token chunk
    is handled as a row)."""

    def __init__(self, spans: list[tuple[int, int]]):
        self.bounds, self.rows = [], []
        start = 0
        for n, b in spans:  # (tokens per sequence, sequences)
            self.bounds.append((start, start + n * b))
            self.rows.append(n == 1)
            start += n * b
        # the trailing run of one-token segments: one RoPE call at their positions
        self.first_row = len(spans)
        while self.first_row > 0 and self.rows[self.first_row - 1]:
            self.first_row -= 1
        self.masks: list = []  # per segment, set before the first layer runs (Layer.make_mask)


class Fetched:
    """Each segment's keys (or values) after a layer's update: handed from
    ``Layer.update_and_fetch`` to the attention untouched."""

    def __init__(self, parts: list):
        self.parts = parts


def _as_rows(x: mx.array) -> mx.array:
    """(1, heads, b, dim) <-> (b, heads, 1, dim): one token per row."""
    return x.transpose(2, 1, 0, 3)


class Layer:
    """Stands in for one layer's cache during a packed pass."""

    def __init__(self, p: Pass, caches: list):
        self.p = p
        self.caches = caches  # each segment's own cache of this layer

    @property
    def offset(self) -> "Layer":
        return self  # read by the wrapped RoPE, which asks each segment's cache

    def make_mask(self, *args, **kwargs):
        """Called once, before any layer updates: each segment's own mask."""
        p = self.p
        p.masks = [c.make_mask(1) if rows and isinstance(c, BatchKVCache) else "causal" if b - a > 1 else None
                   for c, rows, (a, b) in zip(self.caches, p.rows, p.bounds)]
        return None

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        ks, vs = [], []
        for c, rows, (a, b) in zip(self.caches, self.p.rows, self.p.bounds):
            k, v = keys[:, :, a:b], values[:, :, a:b]
            k, v = c.update_and_fetch(_as_rows(k), _as_rows(v)) if rows else c.update_and_fetch(k, v)
            ks.append(k)
            vs.append(v)
        return Fetched(ks), Fetched(vs)


class PackedRope(nn.Module):
    """A model's RoPE, applied per segment at that segment's positions when
    the offset is a packed ``Layer``; otherwise the model's own."""

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.inner = rope

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        if not isinstance(offset, Layer):
            return self.inner(x, offset=offset)
        p, caches = offset.p, offset.caches
        k = p.first_row
        parts = [self.inner(x[:, :, a:b], offset=c.offset) for c, (a, b) in zip(caches[:k], p.bounds)]
        if k < len(caches):  # every decoding row: one call, each at its own position
            at = mx.concatenate([c.offset if isinstance(c.offset, mx.array) else mx.array([c.offset])
                                 for c in caches[k:]])
            parts.append(_as_rows(self.inner(_as_rows(x[:, :, p.bounds[k][0]:]), offset=at)))
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)


def _sdpa(queries, keys, values, cache, scale, mask, **kwargs):
    if not isinstance(cache, Layer):
        return _ORIGINAL_SDPA(queries, keys, values, cache=cache, scale=scale, mask=mask, **kwargs)
    p = cache.p
    mixed = not all(p.rows)  # a prompt chunk rides along: its attention syncs, the rows' may join it
    outs: list = [None] * len(p.rows)
    fast = []  # (segment, (q, k, v, mask)): packed_attention, one sync for all
    for i, (rows, (a, b), k, v, m) in enumerate(zip(p.rows, p.bounds, keys.parts, values.parts, p.masks)):
        q = _as_rows(queries[:, :, a:b]) if rows else queries[:, :, a:b]
        if mixed and packed_attention.applies(q, k, m, kwargs):
            fast.append((i, (q, k, v, m)))
        else:
            outs[i] = _ORIGINAL_SDPA(q, k, v, cache=None, scale=scale, mask=m, **kwargs)
    if fast:
        for (i, _), out in zip(fast, packed_attention.attend([part for _, part in fast], scale)):
            outs[i] = out
    outs = [_as_rows(o) if rows else o for o, rows in zip(outs, p.rows)]
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


class LastRows(nn.Module):
    """The model's final norm, over the last ``keep`` tokens only while a
    packed pass asks for them: the output head then runs for the decoding
    rows, not for every prompt-chunk token (n x vocab logits never used)."""

    keep = 0  # set by ``forward`` around a packed pass

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.inner = norm

    def __call__(self, h: mx.array) -> mx.array:
        return self.inner(h[:, -LastRows.keep :] if LastRows.keep else h)


def forward(model, tokens: mx.array, spans: list[tuple[int, int]], caches: list[list],
            last: int = 0) -> mx.array:
    """One packed pass: ``tokens`` (1-D) are the segments' new tokens end to
    end, ``spans`` each segment's (tokens per sequence, sequences), ``caches``
    each segment's cache layers. Returns the logits (1, tokens, vocab): of
    every token, or of at least the ``last`` ones where the model allows."""
    p = Pass(spans)
    layers = [Layer(p, [cache[i] for cache in caches]) for i in range(len(caches[0]))]
    LastRows.keep = last
    try:
        return model(tokens[None], cache=layers)
    finally:
        LastRows.keep = 0


def mixable(model) -> bool:
    """Whether packed passes drive this model exactly, checked once (at load,
    methods.py): wraps its RoPE and attention (both pass through anything
    but a packed pass), then compares a packed pass with separate passes
    (``_agrees``). A check that ran out of memory decides nothing: until
    one completes, batches merge (asked again as each decode batch forms)."""
    known = getattr(model, _FLAG, None)
    if known is None:
        try:
            faults.hit("selfcheck")
            known = _enable(model) and _agrees(model)
        except Exception as exc:
            if errors.is_out_of_memory(exc):
                log.warning("packed passes' self-check ran out of memory (%s): asked again later", exc)
                return False
            log.debug("packed passes unavailable for this model", exc_info=True)  # it reads positions its own way
            known = False
        object.__setattr__(model, _FLAG, known)
        log.info("packed passes %s for %s", "on" if known else "off", type(model).__module__)
    return known


def _enable(model) -> bool:
    if not all(type(c) is KVCache for c in make_prompt_cache(model)):
        return False  # windows, recurrent or quantized layers: their own layout
    attentions = [m for _, m in model.named_modules() if isinstance(getattr(m, "rope", None), nn.Module)]
    if not attentions or len(attentions) != len(make_prompt_cache(model)):
        return False
    for m in attentions:
        namespace = vars(sys.modules[type(m).__module__])
        if namespace.get("scaled_dot_product_attention") not in (_ORIGINAL_SDPA, _sdpa):
            return False  # its own attention kernel: nothing to split
    for m in attentions:
        namespace = vars(sys.modules[type(m).__module__])
        namespace["scaled_dot_product_attention"] = _sdpa
        if not isinstance(m.rope, PackedRope):
            m.rope = PackedRope(m.rope)
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "norm", None), nn.Module) and not isinstance(inner.norm, LastRows):
        inner.norm = LastRows(inner.norm)  # checked by _agrees like the rest
    return True


def _agrees(model, tolerance: float = 1e-3) -> bool:
    """Prompt chunks (one of a single token ahead of a longer one, each
    continuing a prefix), a row with its own cache and two rows sharing a
    BatchKVCache, at different depths, through one packed pass, give the
    logits separate passes give; so does the pass with the head cut to the
    rows (``last``)."""
    chunks = [([5, 9], [47]), ([13], [37, 41, 43])]  # (prefix already in the cache, chunk)
    rows = [([3, 5, 7], 11), ([17, 19, 23, 29], 31), ([2, 4], 33)]
    want = [model(_ids(new), cache=_filled(model, prefix))[0] for prefix, new in chunks + [(p, [t]) for p, t in rows]]
    expected = mx.concatenate(want).astype(mx.float32)
    scale = mx.abs(expected).max().item() or 1.0
    tokens = mx.array([t for _, c in chunks for t in c] + [t for _, t in rows], dtype=mx.uint32)
    spans = [(1, 1), (3, 1), (1, 1), (1, 2)]

    def caches() -> list:
        own = [_filled(model, p) for p in [p for p, _ in chunks] + [rows[0][0]]]
        return own + [[BatchKVCache.merge(pair) for pair in zip(*[_filled(model, p) for p, _ in rows[1:]])]]

    got = forward(model, tokens, spans, caches())[0].astype(mx.float32)
    last = forward(model, tokens, spans, caches(), last=3)[0, -3:].astype(mx.float32)
    return bool(mx.abs(got - expected).max().item() <= tolerance * scale
                and mx.abs(last - expected[-3:]).max().item() <= tolerance * scale)


def _ids(tokens: list[int]) -> mx.array:
    return mx.array([tokens], dtype=mx.uint32)


def _filled(model, prefix: list[int]) -> list:
    cache = make_prompt_cache(model)
    model(_ids(prefix), cache=cache)
    return cache

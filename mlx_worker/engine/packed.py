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
from mlx_lm.models.cache import KVCache, make_prompt_cache

log = logging.getLogger("mlx_worker.engine.packed")

_ORIGINAL_SDPA = base.scaled_dot_product_attention
_mixable: dict[int, bool] = {}  # id(model) -> whether packed passes are exact on it


class Pass:
    """One packed pass: each sequence's span of the row (a prompt chunk
    first, if any; then decoding rows of one token each) and its masks."""

    def __init__(self, lengths: list[int]):
        self.bounds = []
        start = 0
        for n in lengths:
            self.bounds.append((start, start + n))
            start += n
        # a chunk attends causally within itself; one token sees all its KV
        self.masks = ["causal" if n > 1 else None for n in lengths]
        self.singles = next((i for i, n in enumerate(lengths) if n == 1 and all(m == 1 for m in lengths[i:])),
                            len(lengths))


class Fetched:
    """Each sequence's keys (or values) after a layer's update: handed from
    ``Layer.update_and_fetch`` to the attention untouched."""

    def __init__(self, parts: list):
        self.parts = parts


class Layer:
    """Stands in for one layer's cache during a packed pass."""

    def __init__(self, p: Pass, caches: list):
        self.p = p
        self.caches = caches  # each sequence's own cache of this layer

    @property
    def offset(self) -> "Layer":
        return self  # read by the wrapped RoPE, which asks each sequence's cache

    def make_mask(self, *args, **kwargs):
        return None  # per sequence: Pass.masks

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        ks, vs = [], []
        for c, (a, b) in zip(self.caches, self.p.bounds):
            k, v = c.update_and_fetch(keys[:, :, a:b], values[:, :, a:b])
            ks.append(k)
            vs.append(v)
        return Fetched(ks), Fetched(vs)


class PackedRope(nn.Module):
    """A model's RoPE, applied per sequence at that sequence's positions
    when the offset is a packed ``Layer``; otherwise the model's own."""

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.inner = rope

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        if not isinstance(offset, Layer):
            return self.inner(x, offset=offset)
        p, caches = offset.p, offset.caches
        parts = [self.inner(x[:, :, a:b], offset=c.offset) for c, (a, b) in zip(caches[: p.singles], p.bounds)]
        if p.singles < len(caches):  # the decoding rows: one call, each at its own position
            start = p.bounds[p.singles][0]
            rows = x[:, :, start:].transpose(2, 1, 0, 3)
            at = mx.array([c.offset for c in caches[p.singles :]])
            parts.append(self.inner(rows, offset=at).transpose(2, 1, 0, 3))
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)


def _sdpa(queries, keys, values, cache, scale, mask, **kwargs):
    if not isinstance(cache, Layer):
        return _ORIGINAL_SDPA(queries, keys, values, cache=cache, scale=scale, mask=mask, **kwargs)
    outs = [_ORIGINAL_SDPA(queries[:, :, a:b], k, v, cache=None, scale=scale, mask=m, **kwargs)
            for (a, b), k, v, m in zip(cache.p.bounds, keys.parts, values.parts, cache.p.masks)]
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def forward(model, tokens: mx.array, lengths: list[int], caches: list[list]) -> mx.array:
    """One packed pass: ``tokens`` (1-D) are the sequences' new tokens end to
    end, ``lengths`` how many each has, ``caches`` each one's own cache
    layers. Returns every token's logits, (1, total, vocab)."""
    p = Pass(lengths)
    layers = [Layer(p, [cache[i] for cache in caches]) for i in range(len(caches[0]))]
    return model(tokens[None], cache=layers)


def mixable(model) -> bool:
    """Whether packed passes drive this model exactly (checked once: wraps,
    then compares a packed pass of two sequences with separate passes)."""
    key = id(model)
    if key not in _mixable:
        try:
            _mixable[key] = _enable(model) and _agrees(model)
        except Exception:  # a model that reads positions some other way
            log.debug("packed passes unavailable for this model", exc_info=True)
            _mixable[key] = False
        log.info("packed passes %s for %s", "on" if _mixable[key] else "off", type(model).__module__)
    return _mixable[key]


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
    return True


def _agrees(model, tolerance: float = 1e-3) -> bool:
    """A prompt chunk and two decoding rows at different depths, through one
    packed pass, give the logits separate passes give."""
    ids = lambda xs: mx.array([xs], dtype=mx.uint32)  # noqa: E731
    rows = [([3, 5, 7], 11), ([17, 19, 23, 29], 31)]
    chunk = [37, 41, 43]
    want = [model(ids(chunk), cache=make_prompt_cache(model))[0]]
    segments = [(chunk, make_prompt_cache(model))]
    for prefix, token in rows:
        alone, packed = make_prompt_cache(model), make_prompt_cache(model)
        model(ids(prefix), cache=alone)
        model(ids(prefix), cache=packed)
        want.append(model(ids([token]), cache=alone)[0])
        segments.append(([token], packed))
    tokens = mx.array([t for seq, _ in segments for t in seq], dtype=mx.uint32)
    got = forward(model, tokens, [len(t) for t, _ in segments], [c for _, c in segments])[0].astype(mx.float32)
    expected = mx.concatenate(want).astype(mx.float32)
    scale = mx.abs(expected).max().item() or 1.0
    return bool(mx.abs(got - expected).max().item() <= tolerance * scale)

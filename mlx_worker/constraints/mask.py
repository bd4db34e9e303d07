"""Apply a token bitmask (one bit per token id, int32 words) to MLX logits.

The stock MLX kernels of llguidance and outlines-core are Metal-only; here
numpy unpacks the bits and ``mx.where`` masks the logits lazily, inside the
step's graph, on every backend. Spec: protocol/README.md § Constrained generation, § Cost.
"""

from __future__ import annotations

import numpy as np

import mlx.core as mx

NEG_INF = float("-inf")


def unpack(words: np.ndarray, vocab: int) -> np.ndarray:
    """Bit i of word w -> entry 32*w + i, as a bool array of length ``vocab``
    (ids past the bitmask are disallowed)."""
    bits = np.unpackbits(words.view(np.uint8), count=min(vocab, words.size * 32), bitorder="little")
    if bits.size < vocab:
        bits = np.concatenate([bits, np.zeros(vocab - bits.size, np.uint8)])
    return bits.view(np.bool_)


def apply(logits: mx.array, allowed: np.ndarray) -> mx.array:
    return mx.where(mx.array(allowed), logits, NEG_INF)


def set_bits(words: np.ndarray, ids, value: bool) -> None:
    view = words.view(np.uint32)
    for i in ids:
        w, b = divmod(i, 32)
        if value:
            view[w] |= np.uint32(1 << b)
        else:
            view[w] &= np.uint32(~(1 << b) & 0xFFFFFFFF)

"""A packed pass's prompt-chunk attention on the CPU, its softmax in NumPy.

MLX's CPU backend computes ``exp`` one element at a time (~12 ns each on
x86-64, 25 x NumPy's SIMD exp): most of a chunk's attention over a deep cache
(16 tokens at depth 2,000: 4.0 ms per layer by MLX's attention, 1.2 ms so).
The scores are evaluated, exponentiated and normalized by NumPy, then go
back to MLX for the product with the values. Only packed passes use it (a
request alone keeps mlx-lm's exact computation). Spec: "Batching".
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

ENABLED = os.environ.get("MLX_WORKER_CHUNK_SOFTMAX", "1") != "0"
# The scores are held three times (MLX's, NumPy's, MLX's copy back): above
# this many (heads x chunk x keys, 32 MB each) MLX's own attention, which
# holds them once. Faster at every size measured below it (16 x 1,000 up to
# 512 x 2,000 x 8 heads: 1.6-3.3 x).
MAX_SCORES = 1 << 23


def applies(q: mx.array, k: mx.array, mask, kwargs: dict) -> bool:
    """Whether a chunk's attention can take this path: a causal float32
    chunk on the CPU, nothing else asked of the attention (sinks...)."""
    return (ENABLED and mask == "causal" and not kwargs and q.dtype == mx.float32 and q.shape[2] > 1
            and q.shape[1] * q.shape[2] * k.shape[2] <= MAX_SCORES and mx.default_device().type == mx.cpu)


def causal(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale, causal) v for a chunk of L queries that ends
    its cache of S keys: q (1, H, L, D), k and v (1, Hk, S, D). Evaluates
    the pass up to this layer's scores (a sync point inside the pass)."""
    B, H, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    rep = H // Hk  # grouped-query heads: query head h reads key head h // rep
    s = (q * scale).reshape(B, Hk, rep * L, D) @ k.swapaxes(-1, -2)
    mx.eval(s)
    a = np.array(s, copy=True).reshape(B, Hk, rep, L, S)
    a[..., np.arange(S)[None] > np.arange(S - L, S)[:, None]] = -np.inf  # query i sees keys up to S - L + i
    a -= a.max(axis=-1, keepdims=True)
    np.exp(a, out=a)
    a /= a.sum(axis=-1, keepdims=True)
    return (mx.array(a).reshape(B, Hk, rep * L, S) @ v).reshape(B, H, L, D)

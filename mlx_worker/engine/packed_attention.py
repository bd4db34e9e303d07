"""A mixed pass's attention on the CPU, its softmax in NumPy (SIMD exp).

MLX's CPU ``exp`` runs one element at a time (~12 ns, 25 x NumPy's): most of
a prompt chunk's attention over a deep cache (16 tokens at depth 2,000: 4.0
ms a layer by MLX, 1.2 ms here), a good part of the decoding rows'. A layer's
scores, every segment's, are evaluated together (one sync per layer), go
through NumPy's softmax and back to MLX for the values' product. Spec:
"Batching". ``MLX_WORKER_CHUNK_SOFTMAX=0``: MLX's own attention.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

ENABLED = os.environ.get("MLX_WORKER_CHUNK_SOFTMAX", "1") != "0"
# The scores are held three times (MLX's, NumPy's, MLX's copy back): above
# this many in a segment (rows x heads x queries x keys, 32 MB each) MLX's
# own attention, which holds them once. Faster at every size measured below
# it (16 x 1,000 up to 512 x 2,000 x 8 heads: 1.6-3.3 x).
MAX_SCORES = 1 << 23


def applies(q: mx.array, k: mx.array, mask, kwargs: dict) -> bool:
    """Whether a segment's attention can take this path: float32 on the CPU,
    a causal chunk or decoding rows (a boolean mask or none), nothing else
    asked of the attention (sinks...)."""
    if not ENABLED or kwargs or q.dtype != mx.float32 or mx.default_device().type != mx.cpu:
        return False
    if isinstance(mask, str):
        shaped = mask == "causal" and q.shape[2] > 1
    else:
        shaped = q.shape[2] == 1 and (mask is None or mask.dtype == mx.bool_)
    return shaped and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= MAX_SCORES


def attend(parts: list, scale: float) -> list[mx.array]:
    """softmax(q k^T * scale, mask) v for each (q, k, v, mask) of a layer:
    q (B, H, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv); a causal chunk's L
    queries end its S keys. Evaluates the pass up to this layer's scores."""
    scores = []
    for q, k, _, mask in parts:
        B, H, L, D = q.shape
        Hk = k.shape[1]  # grouped-query heads: query head h reads key head h // (H // Hk)
        s = (q * scale).reshape(B, Hk, H // Hk * L, D) @ k.swapaxes(-1, -2)
        scores.append(s if mask is None or isinstance(mask, str) else mx.where(mask, s, -mx.inf))
    mx.eval(scores)
    outs = []
    for (q, k, v, mask), s in zip(parts, scores):
        B, H, L, _ = q.shape
        Hk, S = k.shape[1], k.shape[2]
        a = np.array(s, copy=True)
        if isinstance(mask, str):  # causal: query i sees keys up to S - L + i (only the last L are ever hidden)
            a = a.reshape(B, Hk, H // Hk, L, S)
            a[..., S - L :][..., np.triu(np.ones((L, L), dtype=bool), 1)] = -np.inf
        a -= a.max(axis=-1, keepdims=True)
        np.exp(a, out=a)
        a /= a.sum(axis=-1, keepdims=True)
        outs.append((mx.array(a).reshape(B, Hk, H // Hk * L, S) @ v).reshape(B, H, L, v.shape[-1]))
    return outs

"""A packed pass's prompt-chunk attention on the CPU, with an exp that vectorizes.

MLX's CPU backend computes ``exp`` one element at a time (~12 ns each on
x86-64, 25 x numpy's), a large part of a chunk's pass over a deep cache (16
tokens at depth 1,900: ~3.9 ms per layer in attention). Here exp is a
polynomial of plain arithmetic (Cephes' expf), within ~1e-7 of exp. Only
packed passes use it (a request alone keeps mlx-lm's exact computation).
Spec: "Batching". ``MLX_WORKER_CHUNK_SOFTMAX=0``: MLX's own softmax.
"""

from __future__ import annotations

import os

import mlx.core as mx

ENABLED = os.environ.get("MLX_WORKER_CHUNK_SOFTMAX", "1") != "0"
# Above about this many scores (heads x chunk x keys) the unfused steps'
# temporaries cost more than the scalar exp saves (measured here: ~1.5 x
# faster at 16-32 tokens x 1,000-1,900 keys x 8 heads, 1.6 x slower at 64 x 1,964 x 8).
MAX_SCORES = 1 << 19
_LOG2E = 1.4426950408889634


def fast_exp(x: mx.array) -> mx.array:
    """exp(x) for x <= 0 as p * 2**n: p by Cephes' expf polynomial, 2**n
    from its float bits. Not ``mx.compile``d: on the CPU that compiles C++
    at first use (~4 s on a fresh machine, and it needs a compiler) for
    ~15 % more speed."""
    x = mx.maximum(x, -87.0)  # exp(-87) ~ 1.6e-38: as good as 0 beside the largest weight, 1
    n = mx.floor(x * _LOG2E + 0.5)
    r = x - n * 0.693359375 + n * 2.12194440e-4  # x - n ln 2, in two parts for precision
    p = 1.9875691500e-4
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + c
    p = p * r * r + r + 1.0
    return p * mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)


def applies(q: mx.array, k: mx.array, mask, kwargs: dict) -> bool:
    """Whether a chunk's attention can take this path: a causal float32
    chunk on the CPU, nothing else asked of the attention (sinks...)."""
    return (ENABLED and mask == "causal" and not kwargs and q.dtype == mx.float32 and q.shape[2] > 1
            and q.shape[1] * q.shape[2] * k.shape[2] <= MAX_SCORES and mx.default_device().type == mx.cpu)


def causal(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale, causal) v for a chunk of L queries that ends
    its cache of S keys: q (1, H, L, D), k and v (1, Hk, S, D)."""
    B, H, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    rep = H // Hk  # grouped-query heads: query head h reads key head h // rep
    s = (q * scale).reshape(B, Hk, rep * L, D) @ k.swapaxes(-1, -2)
    s = s.reshape(B, Hk, rep, L, S)
    s = mx.where(mx.arange(S)[None] <= mx.arange(S - L, S)[:, None], s, -mx.inf)
    e = fast_exp(s - mx.max(s, axis=-1, keepdims=True))
    weights = (e / mx.sum(e, axis=-1, keepdims=True)).reshape(B, Hk, rep * L, S)
    return (weights @ v).reshape(B, H, L, D)

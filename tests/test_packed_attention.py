"""A mixed pass's attention on the CPU (engine/packed_attention.py) equals
MLX's own attention: a causal chunk at the end of its keys, decoding rows
with a left-padding mask, grouped-query heads, values wider than keys (as
multi-head latent attention has them). The mixed-pass tests check the same
through a real worker on real models; this one reaches the shapes no
fixture has."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_worker.engine import packed_attention


def _random(*shape):
    return mx.random.normal(shape).astype(mx.float32)


@pytest.mark.parametrize("dv", [16, 24])
def test_a_chunk_and_rows_in_one_sync_equal_mlx_attention(dv):
    mx.random.seed(7)
    scale = 0.25
    # a 5-token chunk ending its 37 keys; 8 query heads over 2 KV heads
    q, k, v = _random(1, 8, 5, 16), _random(1, 2, 37, 16), _random(1, 2, 37, dv)
    # 3 decoding rows over 20 keys, left-padded by 0, 4 and 11
    rq, rk, rv = _random(3, 8, 1, 16), _random(3, 2, 20, 16), _random(3, 2, 20, dv)
    mask = mx.arange(20)[None] >= mx.array([0, 4, 11])[:, None]
    mask = mask[:, None, None, :]
    parts = [(q, k, v, "causal"), (rq, rk, rv, mask)]
    assert all(packed_attention.applies(p[0], p[1], p[3], {}) for p in parts)
    got = packed_attention.attend(parts, scale)
    want = [mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"),
            mx.fast.scaled_dot_product_attention(rq, rk, rv, scale=scale, mask=mask)]
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert mx.abs(g - w).max().item() < 1e-5


def test_what_it_leaves_to_mlx():
    q, k = _random(1, 8, 4, 16), _random(1, 2, 30, 16)
    assert not packed_attention.applies(q, k, "causal", {"sinks": mx.zeros((8,))})  # attention sinks
    assert not packed_attention.applies(q.astype(mx.bfloat16), k, "causal", {})  # not float32
    assert packed_attention.applies(q[:, :, :1], k, None, {})  # a row with no mask: taken
    additive = mx.zeros((1, 1, 1, 30))
    assert not packed_attention.applies(q[:, :, :1], k, additive, {})  # an additive mask
    big = _random(1, 8, 512, 16)
    assert not packed_attention.applies(big, _random(1, 2, 2049, 16), "causal", {})  # above MAX_SCORES

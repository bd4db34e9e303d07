"""The chunk-size controller (engine/chunking.py) on passes whose cost is a
fixed part plus a part per token, as measured on this machine: it settles at
its target from below, for a pass of one prompt and for k prompts advancing
together (the size is per prompt: the scheduler tunes with one prompt's
tokens, prefill_turns.run_one)."""

from __future__ import annotations

import pytest

from mlx_worker.engine.chunking import MIN_CHUNK, ChunkSize


def settle(k: int, fixed: float, per_token: float, passes: int = 30) -> list[float]:
    chunks = ChunkSize(steps=2.0, chunk=64)
    chunks.stepped(0.020)  # a decode step of 20 ms: the target is 40 ms
    times = []
    for _ in range(passes):
        n = chunks.chunk
        dt = fixed + per_token * k * n  # k prompts, n tokens each, in one pass
        times.append(dt)
        chunks.tune(n, dt, 2048)
    return times


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("fixed, per_token", [(0.0, 0.0002), (0.015, 0.0002), (0.005, 0.001)])
def test_passes_settle_at_the_target_from_below(k, fixed, per_token):
    times = settle(k, fixed, per_token)
    target = 0.040
    floor = fixed + per_token * k * MIN_CHUNK  # the smallest pass there is
    assert all(t <= max(target, floor) * 1.01 for t in times[3:]), times
    assert times[-1] >= min(0.9 * target, floor * 0.99), times


def test_a_short_last_chunk_does_not_shrink_the_size():
    chunks = ChunkSize(steps=2.0, chunk=200)
    chunks.stepped(0.020)
    chunks.tune(5, 0.004, 2048)  # a prompt's last 5 tokens, fast
    assert chunks.chunk == 200

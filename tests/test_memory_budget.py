"""One budget and run-time limits: prompt-cache entries of every model share
one byte budget (oldest entry across stores goes first), and `set_limits`
changes the memory limit, the budgets and (Metal) the wired limit at run time."""

from __future__ import annotations

import pytest

from conftest import spawn
from mlx_worker.client import RpcError


def prompt(n: int, salt: int) -> list[int]:
    return [7 + (i * 13 + salt) % 900 for i in range(n)]


def store_entries(w) -> dict:
    return {m.model_id: m.prompt_cache.entries for m in w.status().models}


def test_one_lru_across_models_and_set_limits(tiny_model):
    w = spawn()
    try:
        w.load(tiny_model, model_id="a")
        w.load(tiny_model, model_id="b")
        w.generate(model_id="a", tokens=prompt(600, 1), max_tokens=4, ignore_eos=True).wait()
        w.generate(model_id="b", tokens=prompt(600, 2), max_tokens=4, ignore_eos=True).wait()
        pools = w.status().memory.pools
        assert store_entries(w) == {"a": 1, "b": 1} and pools.prompt_cache_entries == 2
        one = pools.prompt_cache // 2
        assert pools.weights == sum(m.memory_bytes for m in w.status().models) and pools.requests == 0

        # A budget for one entry: the globally oldest (a's) goes, b's stays.
        result = w.set_limits(prompt_cache_bytes=one + one // 2)
        assert result.evicted_bytes >= one and result.pools.prompt_cache_limit == one + one // 2
        assert store_entries(w) == {"a": 0, "b": 1}
        # b's entry is read again (a hit refreshes it); then a new entry of a
        # pushes out the oldest across stores: b's.
        again = w.generate(model_id="b", tokens=prompt(600, 2) + [5, 6], max_tokens=2, ignore_eos=True).wait()
        assert again.usage.cached_tokens >= 600
        w.generate(model_id="a", tokens=prompt(600, 3), max_tokens=4, ignore_eos=True).wait()
        assert store_entries(w) == {"a": 1, "b": 0}
        assert w.status().memory.pools.prompt_cache <= one + one // 2

        # The other limits, at run time.
        result = w.set_limits(memory_limit=512 << 20, buffer_cache_bytes=1 << 20, wired_limit=1 << 30)
        status = w.status().memory
        assert result.limit == status.limit == 512 << 20
        assert status.pools.buffer_cache_limit == 1 << 20
        assert result.wired_limit_applied is False and status.pools.wired_limit is None  # no Metal here
        with pytest.raises(RpcError) as e:
            w.set_limits(prompt_cache_bytes=-1)
        assert e.value.code == -32602 and e.value.data["field"] == "params.prompt_cache_bytes"
        # A memory limit that weights + entries exceed: the entries go (one budget).
        w.set_limits(memory_limit=8 << 30, prompt_cache_bytes=64 << 20)
        w.generate(model_id="b", tokens=prompt(600, 5), max_tokens=4, ignore_eos=True).wait()
        held = w.status().memory
        assert held.pools.prompt_cache_entries == 2
        result = w.set_limits(memory_limit=held.active - held.pools.prompt_cache // 4)
        assert result.evicted_bytes > 0 and result.pools.prompt_cache_entries < 2
        w.set_limits(memory_limit=8 << 30)
        # 0 empties every store; the worker keeps serving.
        assert w.set_limits(prompt_cache_bytes=0).pools.prompt_cache == 0
        assert len(w.generate(model_id="a", tokens=prompt(50, 4), max_tokens=3, ignore_eos=True).wait().tokens) == 3
        assert store_entries(w) == {"a": 0, "b": 0}
    finally:
        w.close()


def test_prompt_cache_bytes_flag(tiny_model):
    w = spawn("--prompt-cache-bytes", str(3 << 20))
    try:
        assert w.status().memory.pools.prompt_cache_limit == 3 << 20
        w.load(tiny_model, model_id="a")
        assert w.status().models[0].prompt_cache.max_bytes == 3 << 20
    finally:
        w.close()

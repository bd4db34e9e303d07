"""Memory: limits refuse work that would not fit (-32005) instead of letting
the process die, unload gives memory back, and many requests don't leak."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from conftest import ROOT, spawn
from mlx_worker.client import RpcError

sys.path.insert(0, str(ROOT / "bench"))
from soak import soak  # noqa: E402

MiB = 1 << 20


def weights_of(model: str) -> int:
    return sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))


def oom(error) -> dict:
    error = getattr(error, "value", error)  # pytest.raises' ExceptionInfo or the RpcError
    assert error.code == -32005, error
    data = error.data
    assert data["needed"] > data["available"]
    return data


def test_load_memory_limit_smaller_than_the_weights(fresh_worker, tiny_model):
    with pytest.raises(RpcError) as e:
        fresh_worker.load(tiny_model, memory_limit=MiB)
    data = oom(e)
    assert data["limit_kind"] == "model" and data["weights"] == weights_of(tiny_model)
    status = fresh_worker.status()
    assert status.models == [] and status.memory.active < MiB
    with pytest.raises(RpcError) as e:
        fresh_worker.load(tiny_model, memory_limit=0)
    assert e.value.code == -32602 and e.value.data["field"] == "params.memory_limit"


def test_model_memory_limit_refuses_requests_that_would_not_fit(fresh_worker, tiny_model):
    """Everything admitted under a model's memory_limit stays under it
    (peak_memory is measured by MLX during the run); the rest is refused
    up front, and the worker keeps serving."""
    limit = weights_of(tiny_model) + 12 * MiB
    loaded = fresh_worker.load(tiny_model, model_id="tiny", memory_limit=limit)
    assert fresh_worker.status().models[0].memory_limit == limit
    admitted = refused = 0
    for n_prompt, max_tokens, step in [(8, 8, 512), (300, 20, 512), (1500, 10, 128), (1500, 10, 2048),
                                       (3000, 10, 64), (3000, 500, 1024), (200, 3000, 64), (3500, 100, 3500)]:
        tokens = [7 + i % 900 for i in range(n_prompt)]
        try:
            result = fresh_worker.generate(model_id="tiny", tokens=tokens, max_tokens=max_tokens,
                                           prefill_step_size=step, ignore_eos=True, temperature=0).wait()
        except RpcError as e:
            data = oom(e)
            assert data["limit_kind"] == "model" and data["limit"] == limit
            assert "max_tokens" in e.message  # says what would help
            refused += 1
            continue
        admitted += 1
        assert result.peak_memory <= limit, (n_prompt, max_tokens, step, result.peak_memory, limit)
    assert admitted >= 3 and refused >= 2, (admitted, refused)
    small = fresh_worker.generate(model_id="tiny", prompt="still here", max_tokens=4, ignore_eos=True).wait()
    assert len(small.tokens) == 4
    assert loaded.memory_bytes <= limit


def test_worker_memory_limit_flag(tiny_model, small_model):
    limit = 48 * MiB
    w = spawn("--memory-limit", str(limit))
    try:
        assert w.status().memory.limit == limit
        # small-llama's 92 MiB of weights cannot fit: refused before loading
        with pytest.raises(RpcError) as e:
            w.load(small_model)
        assert oom(e)["limit_kind"] == "worker"
        assert w.status().models == []
        w.load(tiny_model, model_id="tiny")
        # a 4,000-token prefill in one chunk needs ~400 MiB on CPU
        with pytest.raises(RpcError) as e:
            w.generate(model_id="tiny", tokens=[9] * 4000, max_tokens=10, prefill_step_size=4096).wait()
        assert oom(e)["limit_kind"] == "worker"
        # the same prompt in small chunks fits
        ok = w.generate(model_id="tiny", tokens=[9] * 4000, max_tokens=2, prefill_step_size=256, ignore_eos=True).wait()
        assert len(ok.tokens) == 2 and ok.peak_memory <= limit
    finally:
        w.close()


def test_default_limit_guards_absurd_requests(fresh_worker, tiny_model):
    """Without any limit set, MLX's default (a share of RAM) still applies:
    a request no machine could hold is refused, not attempted (on CPU an
    allocation that fails crashes the process)."""
    fresh_worker.load(tiny_model, model_id="tiny")
    assert fresh_worker.status().memory.limit > 0
    # A rotating cache lifts the context limit: ask for 2^31 - 1 KV tokens (the bound: MLX indexes them with int32).
    fresh_worker.load(tiny_model, model_id="huge", max_kv_size=2**31 - 1)
    with pytest.raises(RpcError) as e:
        fresh_worker.generate(model_id="huge", prompt="x", max_tokens=2**31 - 1 - 10).wait()
    assert oom(e)["limit_kind"] == "worker"
    assert fresh_worker.generate(model_id="tiny", prompt="x", max_tokens=2, ignore_eos=True).wait().tokens


def test_unload_returns_memory(fresh_worker, small_model):
    w = fresh_worker
    weights = weights_of(small_model)
    before = w.status().memory
    loaded = w.load(small_model, model_id="small")
    assert loaded.memory_bytes >= 0.95 * weights
    w.generate(model_id="small", prompt="warm up the caches", max_tokens=8, ignore_eos=True).wait()
    during = w.status().memory
    assert during.active >= before.active + 0.95 * weights
    w.unload("small")
    after = w.status().memory
    print(f"\nactive MiB: {before.active / MiB:.1f} -> {during.active / MiB:.1f} -> {after.active / MiB:.1f}; "
          f"RSS MiB: {before.rss / MiB:.1f} -> {during.rss / MiB:.1f} -> {after.rss / MiB:.1f}")
    assert after.active <= before.active + MiB
    assert after.cache == 0
    assert during.rss - after.rss >= 0.5 * weights  # the pages went back to the OS
    assert w.status().models == []
    # load/unload cycles do not accumulate
    for _ in range(3):
        w.load(small_model, model_id="small")
        w.unload("small")
    again = w.status().memory
    assert again.active <= before.active + MiB
    # RSS is malloc's business (freed pages may be kept for reuse): the bound
    # is that cycles never pile up past the footprint of one loaded model.
    assert again.rss <= during.rss + 0.1 * weights, (during.rss, again.rss)


def test_load_unload_cycles_do_not_leak(fresh_worker, tiny_model):
    """Each load used to leave ~60 KB behind (MLX's lazily split PRNG key,
    drawn from by the discarded random init), 2.5 MiB over these 40 cycles."""
    w = fresh_worker
    for _ in range(5):
        w.load(tiny_model, model_id="t")
        w.unload("t")
    before = w.status().memory
    for _ in range(40):
        w.load(tiny_model, model_id="t")
        w.unload("t")
    after = w.status().memory
    assert after.rss - before.rss < MiB, (before.rss, after.rss)
    assert after.active <= before.active + 64 * 1024


@pytest.mark.heavy
def test_bounded_soak_does_not_grow(fresh_worker, tiny_model):
    """A shortened bench/soak.py: mixed requests, unload/load and cancels;
    RSS after warm-up may wobble but must not grow with the request count."""
    fresh_worker.load(tiny_model, model_id="soak")
    stats = soak(fresh_worker, tiny_model, requests=200, seed=7, warmup=60)
    print(f"\nsoak: {stats.requests} requests, RSS {stats.rss_warm / MiB:.1f} -> {stats.rss_end / MiB:.1f} MiB "
          f"({stats.growth * 100:+.2f} %), active {stats.active_warm} -> {stats.active_end} bytes")
    assert stats.rss_end - stats.rss_warm <= max(0.05 * stats.rss_warm, 8 * MiB)
    assert stats.active_end <= stats.active_warm + MiB


@pytest.mark.parametrize("fixture,options", [("tiny-llama", {}), ("tiny-gemma3", {}), ("tiny-llama-q4", {}),
                                             ("tiny-llama", {"kv_bits": 8, "kv_group_size": 32})])
def test_estimate_is_never_under_the_measured_peak(fixture, options):
    """memory_estimate (memory in use at admission + the request's need) is
    at least MLX's measured peak and close to it (bench/memory.py gives the
    ratio per fixture kind); status shows it next to the peak while it runs."""
    from fixtures.build import ensure_model

    w = spawn()
    try:
        w.load(str(ensure_model(fixture)), model_id="m", prompt_cache_entries=0, **options)
        for n_prompt, max_tokens, step in [(1200, 30, 512), (200, 300, 256)]:
            tokens = [7 + (i * 7) % 900 for i in range(n_prompt)]
            stream = w.generate(model_id="m", tokens=tokens, max_tokens=max_tokens, prefill_step_size=step,
                                ignore_eos=True, temperature=0, prompt_cache=False)
            seen = None
            for event in stream:
                if seen is None and event.__class__.__name__ == "TokenEvent":
                    seen = w.status().memory.requests
            result = stream.result
            assert result.peak_memory <= result.memory_estimate <= 1.3 * result.peak_memory, (
                fixture, n_prompt, result.memory_estimate, result.peak_memory)
            assert seen and seen[0].estimate == result.memory_estimate and seen[0].model_id == "m"
            assert 0 < seen[0].need < seen[0].estimate and seen[0].peak > 0
        assert w.status().memory.requests == []
    finally:
        w.close()

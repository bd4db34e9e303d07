"""Quantized KV caches (load's kv_bits / kv_group_size), through a real worker.

The cache is quantized from the first token, so the prompt cache, the prefill
chunking and cache files change nothing: what protocol/README.md ("Numerics
per dtype") promises for fp32 holds with kv_bits too (tiny-llama is fp32).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import spawn
from fixtures.build import ensure_model
from mlx_worker.client import RpcError
from numerics import assert_same_output

PROMPT = "The model writes a stream of tokens to the host, one line at a time, and the host reads them. " * 3
GREEDY = dict(max_tokens=24, temperature=0, ignore_eos=True, top_logprobs=2)


def run(w, **params):
    stream = w.generate(**{**GREEDY, **params})
    result = stream.wait()
    return result, [e for e in stream.events if getattr(e, "logprobs", None)]


@pytest.fixture(scope="module", params=[8, 4])
def qw(request, tiny_model):
    """A worker with tiny-llama loaded with kv_bits (group 32: its head dim is 32)."""
    w = spawn()
    w.load(tiny_model, model_id="q", kv_bits=request.param, kv_group_size=32)
    w.load(tiny_model, model_id="plain")
    yield request.param, w
    w.close()


def test_cached_equals_uncached(qw):
    bits, w = qw
    ids = w.tokenize(model_id="q", text=PROMPT).tokens
    cold, cold_ev = run(w, model_id="q", tokens=ids, prompt_cache=False)
    run(w, model_id="q", tokens=ids[:40])  # stores a prefix of the prompt
    warm, warm_ev = run(w, model_id="q", tokens=ids)
    assert warm.usage.cached_tokens >= 40
    assert_same_output("fp32", cold, warm, cold_ev, warm_ev)


def test_prefill_chunking_changes_nothing(qw):
    bits, w = qw
    ids = w.tokenize(model_id="q", text=PROMPT).tokens
    a, a_ev = run(w, model_id="q", tokens=ids, prompt_cache=False, prefill_step_size=37)
    b, b_ev = run(w, model_id="q", tokens=ids, prompt_cache=False, prefill_step_size=64)
    assert_same_output("fp32", a, b, a_ev, b_ev)


def test_the_cache_is_quantized_and_status_says_so(qw, tiny_model):
    """The stored cache of the same tokens is smaller by the ratio of bits
    (plus a scale and a bias per group of 32 fp32 values)."""
    bits, _ = qw
    sizes = {}
    with spawn() as w:
        w.load(tiny_model, model_id="q", kv_bits=bits, kv_group_size=32)
        w.load(tiny_model, model_id="plain")
        ids = w.tokenize(model_id="q", text=PROMPT).tokens
        for mid in ("q", "plain"):
            run(w, model_id=mid, tokens=ids, max_tokens=1)
        models = {m["model_id"]: m for m in w.call("status", {})["models"]}
    assert (models["q"]["kv_bits"], models["q"]["kv_group_size"]) == (bits, 32)
    assert "kv_bits" not in models["plain"]
    expected = (bits / 8 + 2 * 4 / 32) / 4  # quantized bytes per element / fp32's
    ratio = models["q"]["prompt_cache"]["bytes"] / models["plain"]["prompt_cache"]["bytes"]
    assert ratio == pytest.approx(expected, rel=0.02)


def test_cache_file_round_trip_in_another_process(tiny_model, tmp_path):
    path = str(tmp_path / "q.safetensors")
    with spawn() as w:
        w.load(tiny_model, model_id="q", kv_bits=8, kv_group_size=32)
        ids = w.tokenize(model_id="q", text=PROMPT).tokens
        saved = w.call("cache_save", {"model_id": "q", "tokens": ids, "path": path})
        cold, cold_ev = run(w, model_id="q", tokens=ids, prompt_cache=False)
    assert saved["tokens"] == len(ids)
    with spawn() as w:
        w.load(tiny_model, model_id="q", kv_bits=8, kv_group_size=32)
        loaded = w.call("cache_load", {"model_id": "q", "path": path})
        assert loaded["tokens"] == len(ids)
        warm, warm_ev = run(w, model_id="q", tokens=ids)
        assert warm.usage.cached_tokens == len(ids) - 1
        assert_same_output("fp32", cold, warm, cold_ev, warm_ev)
        # Another quantization, or none, is refused with -32009 naming both.
        w.load(tiny_model, model_id="q4", kv_bits=4, kv_group_size=32)
        w.load(tiny_model, model_id="plain")
        for mid, words in (("q4", "kv_bits 4"), ("plain", "not quantized")):
            with pytest.raises(RpcError) as refused:
                w.call("cache_load", {"model_id": mid, "path": path})
            assert refused.value.code == -32009
            assert "kv_bits 8" in refused.value.message and words in refused.value.message
        assert w.generate(model_id="q", tokens=ids, max_tokens=2).wait().stop_reason  # still serving


def test_unquantized_file_refused_by_quantized_model(tiny_model, tmp_path):
    path = str(tmp_path / "plain.safetensors")
    with spawn() as w:
        w.load(tiny_model, model_id="plain")
        w.call("cache_save", {"model_id": "plain", "prompt": PROMPT, "path": path})
        w.load(tiny_model, model_id="q", kv_bits=8, kv_group_size=32)
        with pytest.raises(RpcError) as refused:
            w.call("cache_load", {"model_id": "q", "path": path})
        assert refused.value.code == -32009 and "not quantized" in refused.value.message


@pytest.mark.parametrize(
    "options, field",
    [
        ({"kv_bits": 8, "kv_group_size": 64}, "params.kv_group_size"),  # head dim 32
        ({"kv_bits": 8}, "params.kv_group_size"),  # the default group of 64 doesn't divide 32 either
        ({"kv_group_size": 32}, "params.kv_group_size"),  # without kv_bits
        ({"kv_bits": 3, "kv_group_size": 32}, "params.kv_bits"),
        ({"kv_bits": 8, "kv_group_size": 16}, "params.kv_group_size"),
        ({"kv_bits": 8, "kv_group_size": 32, "max_kv_size": 64}, "params.kv_bits"),  # rotating
        ({"kv_bits": 8, "max_kv_size": 64}, "params.kv_bits"),  # refused whatever the group size
    ],
)
def test_bad_options_refused(fresh_worker, tiny_model, options, field):
    with pytest.raises(RpcError) as refused:
        fresh_worker.load(tiny_model, model_id="q", **options)
    assert refused.value.code == -32602 and refused.value.data["field"] == field
    assert fresh_worker.call("status", {})["models"] == []
    fresh_worker.load(tiny_model, model_id="q", kv_bits=8, kv_group_size=32)  # keeps serving


def test_sliding_window_model_refused(fresh_worker):
    """Gemma 3's local layers rotate: there is no rotating quantized cache."""
    path = str(ensure_model("tiny-gemma3"))
    before = fresh_worker.call("status", {})["memory"]["active"]
    with pytest.raises(RpcError) as refused:
        fresh_worker.load(path, model_id="g", kv_bits=8, kv_group_size=32)
    assert refused.value.code == -32602 and refused.value.data["field"] == "params.kv_bits"
    assert "sliding-window" in refused.value.message
    status = fresh_worker.call("status", {})
    assert status["models"] == [] and status["memory"]["active"] - before < 4096  # no weight was read (MBs)
    fresh_worker.load(path, model_id="g")  # the same model without kv_bits loads


@pytest.mark.parametrize("bits", [8, 4])
def test_memory_estimate_bounds_the_measured_peak(tiny_model, bits):
    """As tests/test_matrix_text.py does for plain caches: the admission
    estimate (read from a refusal) bounds the same request's measured peak."""
    weights = sum(p.stat().st_size for p in Path(tiny_model).glob("*.safetensors"))
    quant = dict(kv_bits=bits, kv_group_size=32)
    params = dict(tokens=[7 + i % 900 for i in range(600)], max_tokens=20, temperature=0,
                  ignore_eos=True, prompt_cache=False, prefill_step_size=256)
    with spawn() as w:
        w.load(tiny_model, model_id="probe", memory_limit=weights + 1, **quant)
        with pytest.raises(RpcError) as refused:
            w.generate(model_id="probe", **params).wait()
        needed = refused.value.data["needed"]
        quantized_kv = refused.value.data["kv_cache"]
        w.load(tiny_model, model_id="plain", memory_limit=weights + 1)
        with pytest.raises(RpcError) as refused:
            w.generate(model_id="plain", **params).wait()
        # The estimate knows the quantized cache is smaller: bits/8 + 8/32 bytes per value, not 4.
        assert quantized_kv == pytest.approx(refused.value.data["kv_cache"] * (bits / 8 + 0.25) / 4, rel=0.01)
    with spawn() as w:
        loaded = w.load(tiny_model, model_id="m", **quant)
        result = w.generate(model_id="m", **params).wait()
    assert result.peak_memory <= loaded.memory_bytes + needed, (result.peak_memory, loaded.memory_bytes, needed)


def test_vision_model_with_an_image(tmp_path):
    """A vision model's language model takes the quantized cache too: an
    image prompt's second turn from the cache equals the uncached run."""
    from vision_images import b64, noise, png, user

    path = str(ensure_model("tiny-qwen2-vl"))
    messages = user("Describe this picture.", ("image", b64(png(noise(21)))))
    with spawn() as w:
        w.load(path, model_id="v", kv_bits=8, kv_group_size=32)
        cold, cold_ev = run(w, model_id="v", messages=messages, prompt_cache=False)
        run(w, model_id="v", messages=messages, max_tokens=1)
        warm, warm_ev = run(w, model_id="v", messages=messages)
        assert warm.usage.cached_tokens == warm.usage.prompt_tokens - 1
        assert_same_output("fp32", cold, warm, cold_ev, warm_ev)
        status = w.call("status", {})["models"][0]
        assert (status["kv_bits"], status["kv_group_size"]) == (8, 32)

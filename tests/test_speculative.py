"""Speculative decoding with a draft model, through a real worker.

The pair (fixtures/build.py): ``spec-target`` is ``spec-draft`` plus 14
layers whose output projections are scaled by 1e-3, so the draft agrees with
the target on almost every token. Every check compares a request with a draft
against the same request without one, in the same worker.
"""

from __future__ import annotations

import pytest

from conftest import cancel_after, logprob_entries, spawn
from fixtures.build import ensure_model
from mlx_worker import protocol
from mlx_worker.client import RpcError

INVALID_PARAMS = -32602
PROMPT = "the model token server request response error value"


@pytest.fixture(scope="module")
def w():
    worker = spawn()
    worker.load(str(ensure_model("spec-draft")), model_id="draft")
    worker.load(str(ensure_model("spec-target")), model_id="target")
    yield worker
    worker.close()


def run(w, **params) -> tuple[protocol.GenerateResult, list]:
    params.setdefault("model_id", "target")
    params.setdefault("temperature", 0)
    if "messages" not in params and "tokens" not in params:
        params.setdefault("prompt", PROMPT)
    stream = w.generate(**params)
    result = stream.wait()
    return result, stream.events


def pair(w, **params):
    """(without a draft, with it): the same request, no prompt cache unless asked."""
    params.setdefault("prompt_cache", False)
    plain, _ = run(w, **{k: v for k, v in params.items() if k != "num_draft_tokens"})
    spec, events = run(w, draft_model_id="draft", **params)
    return plain, spec, events


def logprobs(events) -> list[float]:
    return [lp.logprob for lp in logprob_entries(events)]


def assert_same(plain: protocol.GenerateResult, spec: protocol.GenerateResult) -> None:
    assert spec.tokens == plain.tokens
    assert spec.text == plain.text
    assert spec.stop_reason == plain.stop_reason
    assert spec.stop_token == plain.stop_token
    assert (spec.content, spec.reasoning) == (plain.content, plain.reasoning)


def test_greedy_output_equals_draftless_and_usage_counts(w):
    for k in (1, 3, 8):
        plain, spec, _ = pair(w, max_tokens=60, ignore_eos=True, num_draft_tokens=k)
        assert_same(plain, spec)
        assert plain.usage.draft_tokens is protocol.UNSET  # no draft, no draft counts
        u = spec.usage
        assert 0 < u.accepted_draft_tokens <= u.draft_tokens
        # Every round proposes up to k tokens and emits what was accepted plus
        # the target's own token (not after the last one, at max_tokens).
        rounds = u.completion_tokens - u.accepted_draft_tokens
        assert u.draft_tokens <= (rounds + 1) * k
        # The pair agrees almost everywhere (extra layers scaled by 1e-3).
        assert u.accepted_draft_tokens >= 0.8 * u.draft_tokens, u


def test_seeded_sampling_penalties_logprobs_equal_draftless(w):
    for seed in (1, 2, 3):
        plain, spec, events = pair(w, max_tokens=40, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True,
                                   repetition_penalty=1.3, logit_bias={"5": 2.0}, logprobs=True, top_logprobs=3,
                                   num_draft_tokens=4)
        assert_same(plain, spec)
        assert spec.usage.accepted_draft_tokens > 0
        _, plain_events = run(w, max_tokens=40, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True,
                              repetition_penalty=1.3, logit_bias={"5": 2.0}, logprobs=True, top_logprobs=3,
                              prompt_cache=False)
        a, b = logprobs(plain_events), logprobs(events)
        assert len(a) == len(b) == len(spec.tokens)
        # Verifying several positions in one forward pass rounds differently.
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3


def test_xtc_and_dry_equal_draftless(w):
    """XTC's coin comes from the key of the position, DRY reads the context:
    both the same with a draft as without."""
    for extra in ({"temperature": 1.0, "seed": 5, "xtc_probability": 0.6, "xtc_threshold": 0.05},
                  {"temperature": 0, "dry_multiplier": 1.5, "dry_allowed_length": 2},
                  {"temperature": 0.8, "seed": 6, "dry_multiplier": 0.8, "xtc_probability": 0.5, "xtc_threshold": 0.02}):
        plain, spec, _ = pair(w, max_tokens=40, ignore_eos=True, num_draft_tokens=4, **extra)
        assert_same(plain, spec)
        assert spec.usage.draft_tokens > 0


@pytest.mark.parametrize("constraint", [
    {"type": "regex", "pattern": "[a-z ]{5,40}"},
    {"type": "json_schema", "schema": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                                        "age": {"type": "integer"}},
                                       "required": ["name", "age"]}},
])
def test_constraint_with_draft_equals_without(w, constraint):
    for k in (2, 5):
        plain, spec, _ = pair(w, max_tokens=60, constraint=constraint, num_draft_tokens=k)
        assert_same(plain, spec)
        assert spec.constraint_complete == plain.constraint_complete
        assert spec.usage.draft_tokens > 0
    for seed in (4, 5):
        plain, spec, _ = pair(w, max_tokens=60, constraint=constraint, temperature=1.0, seed=seed, num_draft_tokens=4)
        assert_same(plain, spec)


def test_stop_strings_equal_draftless(w):
    probe, _ = run(w, max_tokens=30, ignore_eos=True, prompt_cache=False)
    # A stop string made of the text around the 8th token: found mid-round.
    stop = probe.text[len(w.detokenize(probe.tokens[:7], model_id="target")):][:3]
    assert stop
    plain, spec, _ = pair(w, max_tokens=30, ignore_eos=True, stop=[stop], num_draft_tokens=5)
    assert plain.stop_reason == "stop_string"
    assert_same(plain, spec)
    assert spec.stop_string == plain.stop_string


def test_prompt_cache_reuse_with_draft(w):
    w.unload("target")
    w.load(str(ensure_model("spec-target")), model_id="target")  # an empty store
    messages = [{"role": "user", "content": "water sun tree"}]
    first, _ = run(w, messages=messages, max_tokens=20, draft_model_id="draft")
    assert first.usage.cached_tokens == 0
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "more about it"}]
    held = {m.model_id: m.prompt_cache for m in w.status().models}["target"]
    assert (held.entries, held.pair_entries) == (0, 1) and held.pair_bytes > 0  # the pair's store, in status
    second, events = run(w, messages=messages, max_tokens=25, draft_model_id="draft")
    assert second.usage.cached_tokens > first.usage.prompt_tokens // 2
    progress = [e for e in events if isinstance(e, protocol.ProgressEvent)]
    assert progress and all(p.cached == second.usage.cached_tokens for p in progress)
    cold, _ = run(w, messages=messages, max_tokens=25, prompt_cache=False)
    assert_same(cold, second)
    # The same request again and again: each continues the stored pair of
    # caches (mlx_lm.server's output with a draft changes here). The draft's
    # half was cut to the same tokens as the target's: it proposes and gets
    # accepted exactly what it does from scratch.
    cold_spec, _ = run(w, messages=messages, max_tokens=25, prompt_cache=False, draft_model_id="draft")
    for _ in range(3):
        again, _ = run(w, messages=messages, max_tokens=25, draft_model_id="draft")
        assert again.usage.cached_tokens == again.usage.prompt_tokens - 1
        assert_same(cold, again)
        assert (again.usage.draft_tokens, again.usage.accepted_draft_tokens) == \
            (cold_spec.usage.draft_tokens, cold_spec.usage.accepted_draft_tokens)
    # A stop string ended the first turn mid-round: both caches were cut to
    # what was emitted, so the continuation is still exact.
    stop_probe, _ = run(w, prompt="sea draw left", max_tokens=20, ignore_eos=True, prompt_cache=False)
    stop = stop_probe.text[len(w.detokenize(stop_probe.tokens[:6], model_id="target")):][:2]
    cut, _ = run(w, prompt="sea draw left", max_tokens=20, ignore_eos=True, stop=[stop], draft_model_id="draft",
                 num_draft_tokens=6)
    assert cut.stop_reason == "stop_string"
    follow = "sea draw left" + cut.text + " run far"
    again, _ = run(w, prompt=follow, max_tokens=15, ignore_eos=True, draft_model_id="draft", num_draft_tokens=6)
    assert again.usage.cached_tokens > 0
    cold, _ = run(w, prompt=follow, max_tokens=15, ignore_eos=True, prompt_cache=False)
    assert_same(cold, again)
    cold_spec, _ = run(w, prompt=follow, max_tokens=15, ignore_eos=True, prompt_cache=False, draft_model_id="draft",
                       num_draft_tokens=6)
    assert again.usage.accepted_draft_tokens == cold_spec.usage.accepted_draft_tokens


def test_cancel_mid_generation_and_during_prefill(w):
    stream = w.generate(model_id="target", prompt=PROMPT, max_tokens=100000, temperature=0, ignore_eos=True,
                        draft_model_id="draft", num_draft_tokens=4, prompt_cache=False)
    result = cancel_after(stream, 6)
    assert result.stop_reason == "cancelled"
    assert 6 <= len(result.tokens) < 1000
    plain, _ = run(w, max_tokens=len(result.tokens), ignore_eos=True, prompt_cache=False)
    assert plain.tokens == result.tokens
    # Cancel between prefill chunks: progress events come per chunk, no token after.
    long_prompt = " ".join(["the model token server"] * 60)
    stream = w.generate(model_id="target", prompt=long_prompt, max_tokens=20, temperature=0,
                        draft_model_id="draft", prefill_step_size=16, prompt_cache=False)
    chunks = 0
    for event in stream:
        if isinstance(event, protocol.ProgressEvent) and event.processed > 0:
            chunks += 1
            if chunks == 2:
                assert stream.cancel() is True
        elif isinstance(event, protocol.TokenEvent):
            raise AssertionError("no token may come after a cancel during prefill")
    assert stream.result.stop_reason == "cancelled" and stream.result.tokens == []
    after, _ = run(w, max_tokens=5, draft_model_id="draft")
    assert after.stop_reason in ("max_tokens", "eos")


def test_load_defaults_and_turning_them_off(w):
    w.load(str(ensure_model("spec-target")), model_id="target-d", draft_model_id="draft", num_draft_tokens=5)
    try:
        by_default, _ = run(w, model_id="target-d", max_tokens=20, ignore_eos=True, prompt_cache=False)
        assert by_default.usage.draft_tokens > 0
        off, _ = run(w, model_id="target-d", max_tokens=20, ignore_eos=True, prompt_cache=False, num_draft_tokens=0)
        assert off.usage.draft_tokens is protocol.UNSET
        assert off.tokens == by_default.tokens
    finally:
        w.unload("target-d")


def test_mismatched_tokenizer_refused(w):
    w.load(str(ensure_model("spec-draft-alt")), model_id="alt")
    try:
        # Same vocabulary size, different tokens: refused, naming the field.
        with pytest.raises(RpcError) as info:
            run(w, max_tokens=5, draft_model_id="alt")
        assert info.value.code == INVALID_PARAMS
        assert info.value.data["field"] == "params.draft_model_id"
        assert "vocabulary" in info.value.message
        with pytest.raises(RpcError) as info:
            w.load(str(ensure_model("spec-target")), model_id="target-alt", draft_model_id="alt")
        assert info.value.code == INVALID_PARAMS and info.value.data["field"] == "params.draft_model_id"
        assert "target-alt" not in [m.model_id for m in w.status().models]
    finally:
        w.unload("alt")
    for params, field in (({"draft_model_id": "nope"}, "params.draft_model_id"),
                          ({"num_draft_tokens": 3}, "params.num_draft_tokens"),
                          ({"draft_model_id": "draft", "num_draft_tokens": 99}, "params.num_draft_tokens")):
        with pytest.raises(RpcError) as info:
            run(w, max_tokens=5, **params)
        assert info.value.code == INVALID_PARAMS and field in str(info.value.data), params
    with pytest.raises(RpcError) as info:  # a load's default length with no default draft: never used
        w.load(str(ensure_model("spec-target")), model_id="no-draft", num_draft_tokens=2)
    assert info.value.code == INVALID_PARAMS and info.value.data["field"] == "params.num_draft_tokens"
    assert run(w, max_tokens=3)[0].usage.completion_tokens <= 3  # still serving


def test_what_cant_be_exact_is_refused(w):
    w.load(str(ensure_model("tiny-gemma3")), model_id="sliding")
    w.load(str(ensure_model("spec-target")), model_id="windowed", max_kv_size=64)
    w.load(str(ensure_model("tiny-qwen2-vl")), model_id="vision")
    try:
        for target, draft, words in (("sliding", "draft", "RotatingKVCache"), ("target", "sliding", "RotatingKVCache"),
                                     ("windowed", "draft", "max_kv_size"), ("vision", "draft", "vision"),
                                     ("target", "vision", "vision")):
            with pytest.raises(RpcError) as info:
                run(w, model_id=target, max_tokens=5, draft_model_id=draft)
            assert info.value.code == INVALID_PARAMS and info.value.data["field"] == "params.draft_model_id"
            assert words in info.value.message
    finally:
        for model_id in ("sliding", "windowed", "vision"):
            w.unload(model_id)


def test_tools_with_a_draft():
    """tool_choice "none" (a stateless mask) works with a draft and gives the
    draftless output; a tool-call grammar is refused."""
    path = str(ensure_model("tiny-qwen3-tools"))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [{"role": "user", "content": "weather in Paris?"}]
    with spawn() as worker:
        worker.load(path, model_id="m")  # its own draft: the same tokenizer by construction
        base = dict(model_id="m", messages=messages, tools=tools, max_tokens=30, temperature=0, prompt_cache=False)
        plain = worker.generate(**base, tool_choice="none").wait()
        spec = worker.generate(**base, tool_choice="none", draft_model_id="m", num_draft_tokens=3).wait()
        assert_same(plain, spec)
        assert spec.usage.accepted_draft_tokens == spec.usage.draft_tokens  # the draft is the target
        with pytest.raises(RpcError) as info:
            worker.generate(**base, tool_choice="required", draft_model_id="m").wait()
        assert info.value.code == INVALID_PARAMS and info.value.data["field"] == "params.draft_model_id"


def test_unloading_the_draft_waits_for_its_requests(w):
    import time

    stream = w.generate(model_id="target", prompt=PROMPT, max_tokens=100000, temperature=0, ignore_eos=True,
                        draft_model_id="draft", prompt_cache=False)
    next(iter(stream))  # it is running
    rid, inbox = w.start("unload", {"model_id": "draft"})
    time.sleep(0.5)
    assert inbox.empty(), "the draft was unloaded under a running request"
    assert stream.cancel() is True
    assert stream.wait().stop_reason == "cancelled"
    assert w._take(inbox, 60)["result"]["unloaded"] is True
    with pytest.raises(RpcError) as info:
        run(w, max_tokens=5, draft_model_id="draft")
    assert info.value.code == INVALID_PARAMS and info.value.data["field"] == "params.draft_model_id"
    w.load(str(ensure_model("spec-draft")), model_id="draft")
    again, _ = run(w, max_tokens=20, draft_model_id="draft")
    assert again.usage.accepted_draft_tokens > 0


def test_quantized_kv_cache_with_a_draft(w):
    """kv_bits caches (quantized from the first token, one token's K/V at a
    time) verify exactly: output and logprobs as without a draft; a second
    turn continues the pair from the prompt cache."""
    w.load(str(ensure_model("spec-target")), model_id="target-q8", kv_bits=8)
    w.load(str(ensure_model("spec-draft")), model_id="draft-q4", kv_bits=4, kv_group_size=32)
    try:
        for draft in ("draft", "draft-q4"):
            base = dict(model_id="target-q8", max_tokens=40, ignore_eos=True, logprobs=True, prompt_cache=False)
            plain, plain_events = run(w, **base)
            spec, events = run(w, **base, draft_model_id=draft, num_draft_tokens=4)
            assert_same(plain, spec)
            assert max(abs(a - b) for a, b in zip(logprobs(plain_events), logprobs(events))) < 1e-4
            assert spec.usage.accepted_draft_tokens > 0.8 * spec.usage.draft_tokens
        messages = [{"role": "user", "content": "water sun tree"}]
        first, _ = run(w, model_id="target-q8", messages=messages, max_tokens=12, draft_model_id="draft-q4")
        messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "and then"}]
        second, _ = run(w, model_id="target-q8", messages=messages, max_tokens=12, draft_model_id="draft-q4")
        assert second.usage.cached_tokens > 0
        cold, _ = run(w, model_id="target-q8", messages=messages, max_tokens=12, prompt_cache=False)
        assert_same(cold, second)
    finally:
        w.unload("target-q8")
        w.unload("draft-q4")


@pytest.mark.heavy
def test_draft_length_follows_the_acceptance(w):
    """A draft that is rarely right is soon paused (plain steps, with rare
    probes); one that is always right keeps drafting the most. Output equals
    the draftless run's either way, cached and not, greedy and seeded."""
    w.load(str(ensure_model("spec-target-far")), model_id="far")
    try:
        for extra in ({}, {"temperature": 1.0, "seed": 3, "prompt_cache": True}):
            base = dict(max_tokens=80, ignore_eos=True, num_draft_tokens=4, **extra)
            plain, far, _ = pair(w, model_id="far", **base)
            assert_same(plain, far)
            u = far.usage
            assert len(u.draft_rounds) == 5
            assert u.draft_rounds[0] >= 50, u  # mostly plain steps
            assert sum(k * r for k, r in enumerate(u.draft_rounds)) == u.draft_tokens
            assert u.draft_tokens <= 15 and u.accepted_draft_tokens <= u.draft_tokens
            fixed, _ = run(w, model_id="far", draft_model_id="draft", draft_adaptive=False, **base)
            assert_same(plain, fixed)
            assert fixed.usage.draft_rounds[0] <= 1  # fixed: a full draft every round (but a last single token)
            assert fixed.usage.draft_tokens > 4 * 40
            # On the close pair every round drafts the most.
            plain, near, _ = pair(w, **base)
            assert_same(plain, near)
            assert near.usage.draft_rounds[4] >= 12 and near.usage.draft_rounds[0] <= 1, near.usage
    finally:
        w.unload("far")

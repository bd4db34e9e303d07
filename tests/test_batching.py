"""Continuous batching through a real worker: requests sent together run
together, and each one's output is what it would have been alone.

Every comparison is against the same request run alone on the same worker
(tiny-llama is float32: greedy and seeded tokens are equal, logprobs within
1e-4, as the spec's "Batching" section promises).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from conftest import logprob_entries, spawn
from fixtures.build import ensure_model
from mlx_worker import protocol
from vision_images import b64, gradient, noise, png, user

WORDS = "sea ship wind wave the a of harbour north light { } : 1 2".split()


def prompt(i: int, n: int = 12) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n + i))


def variety(i: int) -> dict:
    """Eight requests that differ in every option a request can carry."""
    base = {"model_id": "tiny", "prompt": prompt(i), "max_tokens": 24 + 3 * i, "ignore_eos": True}
    return [
        {**base, "temperature": 0},
        {**base, "temperature": 0.9, "seed": 11},
        {**base, "temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 12, "logprobs": True},
        {**base, "temperature": 0, "repetition_penalty": 1.3, "top_logprobs": 3},
        {**base, "temperature": 1.0, "min_p": 0.05, "seed": 13, "presence_penalty": 0.5, "frequency_penalty": 0.3},
        {**base, "temperature": 0, "logit_bias": {"5": 4.0, "9": -100.0}},
        {**base, "temperature": 0.7, "seed": 14, "stop": ["a", "the"], "ignore_eos": False},
        {**base, "temperature": 0, "max_tokens": 3},
    ][i % 8]


def same_output(alone: protocol.GenerateResult, batched: protocol.GenerateResult, what) -> None:
    assert batched.tokens == alone.tokens, what
    assert batched.text == alone.text, what
    assert batched.stop_reason == alone.stop_reason, what


def events_text(stream) -> str:
    return "".join(e.text for e in stream.events if isinstance(e, protocol.TokenEvent))


def logprobs_of(stream) -> list:
    return logprob_entries(stream.events)


def run_together(w, params: list[dict]) -> tuple[list, list]:
    """Send all at once; sample `status` meanwhile; (streams, running counts seen)."""
    streams = [w.generate(**p) for p in params]
    waiters = [threading.Thread(target=s.wait) for s in streams]
    for t in waiters:
        t.start()
    seen = []
    while any(t.is_alive() for t in waiters):
        seen.append(len(w.status().queue.running))
        time.sleep(0.01)
    for s in streams:
        assert s.result is not None, s.id
    return streams, seen


def alone_then_together(w, params: list[dict], at_least: int) -> list[tuple]:
    """Run each request alone, then all at once (checking at least ``at_least``
    ran together); every pair of results must be the same output."""
    alone = [w.generate(**p).wait() for p in params]
    together, seen = run_together(w, params)
    assert max(seen) >= at_least, f"requests did not run together: {seen}"
    pairs = [(a, b.result) for a, b in zip(alone, together)]
    for i, (a, b) in enumerate(pairs):
        same_output(a, b, (i, params[i]))
    return pairs


@pytest.fixture(scope="module")
def bw(tiny_model):
    w = spawn()
    w.load(tiny_model, model_id="tiny")
    yield w
    w.close()


def test_eight_at_once_equal_each_alone(bw):
    params = [variety(i) for i in range(8)]
    alone = []
    for p in params:
        s = bw.generate(**p)
        s.wait()
        alone.append(s)
    together, seen = run_together(bw, params)
    assert max(seen) >= 4, f"requests did not run together: {seen}"
    for i, (a, b) in enumerate(zip(alone, together)):
        same_output(a.result, b.result, (i, params[i]))
        assert events_text(b) == b.result.text
        la, lb = logprobs_of(a), logprobs_of(b)
        assert len(la) == len(lb)
        for x, y in zip(la, lb):
            assert x.token == y.token and abs(x.logprob - y.logprob) < 1e-4
            assert [t.token for t in x.top or []] == [t.token for t in y.top or []]
        assert b.result.seed == a.result.seed or params[i].get("seed") is None


def test_seed_survives_any_batch_and_arrival_order(bw):
    """A seeded request's tokens depend only on its seed: alone, first or
    last in a batch, beside other seeded requests."""
    mine = {"model_id": "tiny", "prompt": prompt(3), "max_tokens": 30, "temperature": 1.0, "seed": 4242,
            "ignore_eos": True}
    alone = bw.generate(**mine).wait()
    others = [{**variety(i), "seed": 100 + i, "temperature": 1.0} for i in range(5)]
    first, _ = run_together(bw, [mine, *others])
    last, _ = run_together(bw, [*others, mine])
    assert first[0].result.tokens == alone.tokens
    assert last[-1].result.tokens == alone.tokens
    other = bw.generate(**{**mine, "seed": 4243}).wait()
    assert other.tokens != alone.tokens  # the seed matters


def test_cancel_storm_mid_batch(bw):
    base = {"model_id": "tiny", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    params = [{**base, "prompt": prompt(i)} for i in range(8)]
    alone = [bw.generate(**p).wait() for p in params]
    streams = [bw.generate(**p) for p in params]
    cancelled = set()

    def canceller():
        # Cancel every other request once it streamed a few tokens.
        deadline = time.monotonic() + 60
        while len(cancelled) < 4 and time.monotonic() < deadline:
            for i in range(0, 8, 2):
                if i not in cancelled and sum(isinstance(e, protocol.TokenEvent) for e in streams[i].events) >= 3:
                    assert bw.cancel(streams[i].id) is True
                    cancelled.add(i)
            time.sleep(0.002)

    waiters = [threading.Thread(target=s.wait) for s in streams]
    for t in waiters:
        t.start()
    canceller()
    for t in waiters:
        t.join()
    results = [s.result for s in streams]
    assert cancelled == {0, 2, 4, 6}
    for i, r in enumerate(results):
        if i in cancelled:
            assert r.stop_reason == "cancelled"
            assert 3 <= len(r.tokens) < 400
            assert r.tokens == alone[i].tokens[: len(r.tokens)]  # what it had was right
            assert events_text(streams[i]) == r.text
        else:
            same_output(alone[i], r, i)
    # the worker serves normally afterwards, batch state clean
    assert bw.generate(**params[1]).wait().tokens == alone[1].tokens
    assert bw.status().queue.running == []


def test_constraints_in_a_batch(bw):
    base = {"model_id": "tiny", "max_tokens": 40, "temperature": 0.8}
    params = [
        {**base, "prompt": prompt(0), "seed": 1, "constraint": {"type": "regex", "pattern": "[a-z]{3,8}( [0-9]+)?"}},
        {**base, "prompt": prompt(1), "seed": 2, "constraint": {"type": "choice", "options": ["north", "south", "east"]}},
        {**base, "prompt": prompt(2), "seed": 3, "constraint": {"type": "json_schema", "schema": {
            "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
        {**base, "prompt": prompt(3), "seed": 4, "constraint": {"type": "regex", "pattern": "(ab|cd)+",
                                                              "engine": "outlines"}},
        {**base, "prompt": prompt(4), "seed": 5, "ignore_eos": True},
        {**base, "prompt": prompt(5), "temperature": 0, "ignore_eos": True},
    ]
    alone = [bw.generate(**p).wait() for p in params]
    together, seen = run_together(bw, params)
    assert max(seen) >= 3, seen
    for i, (a, b) in enumerate(zip(alone, together)):
        same_output(a, b.result, i)
        assert b.result.constraint_complete == a.constraint_complete


def test_cached_prefixes_in_a_batch(bw):
    system = " ".join(WORDS * 20)  # a long shared prefix
    primer = {"model_id": "tiny", "prompt": system, "max_tokens": 1, "temperature": 0}
    bw.generate(**primer).wait()  # now in the prompt cache
    params = [{"model_id": "tiny", "prompt": system + " " + prompt(i, 3), "max_tokens": 12, "temperature": 0,
               "ignore_eos": True} for i in range(4)]
    cold = [bw.generate(**p, prompt_cache=False).wait() for p in params]
    together, _ = run_together(bw, params)
    for i, (c, b) in enumerate(zip(cold, together)):
        assert b.result.usage.cached_tokens > 100, (i, b.result.usage)
        same_output(c, b.result, i)
    # each conversation was left in the store: the next turn reuses its whole prompt
    again = bw.generate(**params[2]).wait()
    assert again.usage.cached_tokens >= together[2].result.usage.prompt_tokens - 1
    assert again.tokens == cold[2].tokens


def test_short_request_behind_a_long_prompt_starts_first(bw):
    long = {"model_id": "tiny", "tokens": [7, 8, 9, 10] * 1000, "max_tokens": 4, "prefill_step_size": 256,
            "prompt_cache": False}
    runner = bw.generate(model_id="tiny", prompt=prompt(1), max_tokens=100000, ignore_eos=True, temperature=0)
    next(iter(runner))  # a stream is decoding
    slow = bw.generate(**long)
    short = bw.generate(model_id="tiny", prompt="sea ship", max_tokens=4, temperature=0, ignore_eos=True,
                        prompt_cache=False)
    short_result = short.wait()
    assert slow.wait().stop_reason == "max_tokens"
    lines = [json.loads(line) for line in bw.lines]
    short_done = next(i for i, m in enumerate(lines) if m.get("id") == short.id and "result" in m)
    before = [m["params"] for m in lines[:short_done] if m.get("params", {}).get("id") == slow.id]
    assert before, "the long prompt had not started"
    assert all("tokens" not in p for p in before), "the short request waited for the long prompt"
    assert max(p["processed"] for p in before) < 2000, "the short request waited for most of the long prompt"
    assert runner.cancel() is True and runner.wait().stop_reason == "cancelled"
    alone = bw.generate(model_id="tiny", prompt="sea ship", max_tokens=4, temperature=0, ignore_eos=True).wait()
    assert short_result.tokens == alone.tokens


def test_images_in_a_batch():
    w = spawn()
    try:
        w.load(str(ensure_model("tiny-qwen2-vl")), model_id="vlm")
        base = {"model_id": "vlm", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        params = [
            {**base, "messages": user("Describe this picture.", ("image", b64(png(noise(3)))))},
            {**base, "messages": user("And this one?", ("image", b64(png(gradient()))))},
            {**base, "prompt": "plain text on a vision model"},
            {**base, "messages": user("no image here")},
        ]
        alone_then_together(w, params, at_least=2)
    finally:
        w.close()


def test_memory_admission_of_a_batch(tiny_model):
    w = spawn()
    try:
        req = {"max_tokens": 700, "temperature": 0, "ignore_eos": True, "prompt": prompt(2)}
        w.load(tiny_model, model_id="tiny", memory_limit=room_for_one_and_a_half(w, tiny_model, req))
        a = w.generate(model_id="tiny", **req)
        b = w.generate(model_id="tiny", **req)
        ra, rb = a.wait(), b.wait()
        assert len(ra.tokens) == len(rb.tokens) == req["max_tokens"] and ra.tokens == rb.tokens
        lines = [json.loads(line) for line in w.lines]
        first_b = next(i for i, m in enumerate(lines) if m.get("method") == "token" and m["params"]["id"] == b.id)
        end_a = next(i for i, m in enumerate(lines) if m.get("id") == a.id and "result" in m)
        assert first_b > end_a, "the second request did not wait for memory"
        # One that can never fit is refused at once, while another runs.
        c = w.generate(model_id="tiny", **req)
        with pytest.raises(Exception) as exc:
            w.generate(model_id="tiny", **{**req, "max_tokens": 20000}).wait()
        assert exc.value.code == -32005
        assert c.wait().stop_reason == "max_tokens"
    finally:
        w.close()


def room_for_one_and_a_half(w, tiny_model, req) -> int:
    """A model memory_limit with room for one `req` beside the weights, not two
    (learnt from the -32005 of a limit that admits nothing)."""
    weights = sum(f.stat().st_size for f in Path(tiny_model).glob("*.safetensors"))
    loaded = w.load(tiny_model, model_id="probe", memory_limit=weights + 4096)
    with pytest.raises(Exception) as exc:
        w.generate(model_id="probe", **req).wait()
    need = exc.value.data["needed"]
    w.unload("probe")
    return loaded.memory_bytes + int(need * 1.5)


def line_index(w, pred) -> int:
    return next(i for i, m in enumerate(json.loads(line) for line in w.lines) if pred(m))


def test_requests_start_in_arrival_order_behind_one_waiting_for_memory(tiny_model):
    """A small request that would fit now still starts after a big one that
    came first and waits for memory; a cancelled one queued behind the
    waiting one is answered at once, not when the one ahead is admitted."""
    w = spawn()
    try:
        req = {"max_tokens": 700, "temperature": 0, "ignore_eos": True, "prompt": prompt(2)}
        w.load(tiny_model, model_id="tiny", memory_limit=room_for_one_and_a_half(w, tiny_model, req))
        a = w.generate(model_id="tiny", **req)
        next(iter(a))  # running
        b = w.generate(model_id="tiny", **req)  # waits for a's memory
        c = w.generate(model_id="tiny", **{**req, "max_tokens": 2})  # would fit beside a
        d = w.generate(model_id="tiny", **{**req, "max_tokens": 2})
        while w.status().queue.pending:  # d handed to the scheduler, not only queued
            time.sleep(0.01)
        assert d.cancel() is True
        assert d.wait().stop_reason == "cancelled"
        d_end = line_index(w, lambda m: m.get("id") == d.id and "result" in m)
        first = lambda s: line_index(w, lambda m: m.get("method") == "token" and m["params"]["id"] == s.id)  # noqa: E731
        rc, ra, rb = c.wait(), a.wait(), b.wait()
        a_end = line_index(w, lambda m: m.get("id") == a.id and "result" in m)
        assert d_end < a_end, "a cancelled request waited for the one ahead of it"
        assert first(b) > a_end and first(c) > a_end, "a later request started before an earlier waiting one"
        assert len(rc.tokens) == 2 and ra.tokens == rb.tokens
    finally:
        w.close()


def test_generate_after_a_deferred_unload_finds_no_model(tiny_model):
    """An unload waiting for a running generate came first: a generate sent
    after it is refused -32003, not run ahead of the unload."""
    from mlx_worker.client import RpcError

    w = spawn()
    try:
        w.load(tiny_model, model_id="tiny")
        req = {"model_id": "tiny", "prompt": prompt(1), "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        a = w.generate(**req)
        next(iter(a))  # running: the unload must wait for it
        _, unloaded = w.start("unload", {"model_id": "tiny"})
        while w.status().queue.pending:  # status is read after it: the unload is taken (deferred)
            time.sleep(0.005)
        with pytest.raises(RpcError) as exc:
            w.generate(**{**req, "max_tokens": 2}).wait()
        assert exc.value.code == -32003
        assert len(a.wait().tokens) == 400
        assert "result" in unloaded.get(timeout=30)
        assert w.status().models == []
    finally:
        w.close()


def test_admission_evicts_another_models_prompt_cache_before_refusing(tiny_model):
    """Prompt-cache entries of a model the request doesn't use are evicted
    (least recently used first) before a -32005 refusal."""
    from mlx_worker.client import RpcError

    long = " ".join([prompt(3)] * 60)  # ~1300 tokens
    req = {"model_id": "b", "prompt": long, "max_tokens": 4, "temperature": 0}
    probe = spawn("--memory-limit", str(16 << 20))
    try:
        probe.load(tiny_model, model_id="a")
        probe.load(tiny_model, model_id="b")
        with pytest.raises(RpcError) as exc:
            probe.generate(**req).wait()
        need, base = exc.value.data["needed"], (16 << 20) - exc.value.data["available"]
    finally:
        probe.close()
    room = 4 << 20
    w = spawn("--memory-limit", str(base + need + room))
    try:
        w.load(tiny_model, model_id="a")
        w.load(tiny_model, model_id="b")
        for i in range(5):  # fill a's store: small chunks, so each of these fits
            w.generate(model_id="a", prompt=f"{i} {long}", max_tokens=1, prefill_step_size=128).wait()
        held = {m.model_id: m.prompt_cache for m in w.status().models}["a"]
        assert held.bytes > 2 * room, held  # b's request can't fit beside a's entries
        result = w.generate(**req).wait()
        assert len(result.tokens) == 4
        after = {m.model_id: m.prompt_cache for m in w.status().models}["a"]
        assert after.entries < held.entries
    finally:
        w.close()


def test_cache_save_is_admitted_beside_running_requests(tiny_model, tmp_path):
    """cache_save's prefill counts what the running generates may still
    need: one that fits alone but not beside them is refused -32005 (it
    can't wait: they are paused while it runs), and they finish unharmed."""
    from mlx_worker.client import RpcError

    long = " ".join([prompt(3)] * 30)
    gen_req = {"model_id": "m", "prompt": prompt(2), "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
    save_req = {"model_id": "m", "prompt": long, "path": str(tmp_path / "c.safetensors")}
    w = spawn()
    try:
        weights = sum(f.stat().st_size for f in Path(tiny_model).glob("*.safetensors"))
        loaded = w.load(tiny_model, model_id="m", memory_limit=weights + 4096)
        needs = []
        for call in (lambda: w.generate(**gen_req).wait(), lambda: w.call("cache_save", save_req)):
            with pytest.raises(RpcError) as exc:
                call()
            assert exc.value.code == -32005, exc.value
            needs.append(exc.value.data["needed"])
        w.unload("m")
        need_gen, need_save = needs
        assert need_save <= 2 * need_gen, needs  # so the save alone fits the limit below
        w.load(tiny_model, model_id="m", memory_limit=loaded.memory_bytes + need_gen + need_save // 2)
        a = w.generate(**gen_req)
        next(iter(a))  # running
        with pytest.raises(RpcError) as exc:
            w.call("cache_save", save_req)
        assert exc.value.code == -32005
        assert len(a.wait().tokens) == 3000
        assert w.call("cache_save", save_req)["tokens"] > 0  # alone it fits
    finally:
        w.close()


def test_cache_save_mid_batch_keeps_the_running_requests_peak(tiny_model, tmp_path):
    """peak_memory of a running request still counts its prompt's prefill
    after a cache_save ran beside it (the save doesn't reset MLX's peak)."""
    w = spawn()
    try:
        w.load(tiny_model, model_id="m")
        long = " ".join([prompt(3)] * 60)  # its prefill is the peak: far above its KV's growth
        a = w.generate(model_id="m", prompt=long, max_tokens=800, temperature=0, ignore_eos=True)
        events = iter(a)
        while not isinstance(next(events), protocol.TokenEvent):  # prefilled: the peak so far is its prompt's
            pass
        seen = w.status().memory.peak
        w.call("cache_save", {"model_id": "m", "prompt": prompt(1), "path": str(tmp_path / "c.safetensors")})
        assert a.wait().peak_memory >= seen, (a.result.peak_memory, seen)
    finally:
        w.close()


def test_tool_calls_and_channels_in_a_batch():
    """Tool-call requests (lazy grammar, forced calls, reasoning channels)
    decode in one batch with plain ones; each equals its solo run, channel
    by channel."""
    from test_tools import ASK, TOOLS

    w = spawn()
    try:
        w.load(str(ensure_model("tiny-qwen3-tools")), model_id="qwen3")
        base = {"model_id": "qwen3", "messages": ASK, "max_tokens": 80, "tools": TOOLS}
        params = [
            {**base, "tool_choice": "required", "seed": 1, "temperature": 1.0},
            {**base, "tool_choice": {"name": "get_weather"}, "seed": 2, "temperature": 0.7},
            {**base, "tool_choice": "auto", "seed": 3, "temperature": 1.5},
            {**base, "tool_choice": "none", "seed": 4, "temperature": 1.0},
            {"model_id": "qwen3", "prompt": "plain", "max_tokens": 20, "temperature": 0, "ignore_eos": True},
        ]
        pairs = alone_then_together(w, params, at_least=2)
        for i, (a, b) in enumerate(pairs):
            assert (b.content, b.reasoning) == (a.content, a.reasoning), i
            assert calls(b) == calls(a), i
        assert any(a.tool_calls for a, _ in pairs)
    finally:
        w.close()


def calls(result) -> list:
    """Tool calls without their ids (random per call)."""
    import msgspec

    out = []
    for c in list(result.tool_calls or []) + list(result.invalid_tool_calls or []):
        d = msgspec.to_builtins(c)
        d.pop("id", None)
        out.append(d)
    return out


def test_unbatchable_caches_run_beside_the_batch(tiny_model):
    """Quantized KV (kv_bits) and a rotating cache (max_kv_size) can't merge
    into a batch: such requests decode on their own, stepped in turn with the
    batch, and still equal their solo runs."""
    w = spawn()
    try:
        w.load(tiny_model, model_id="tiny")
        w.load(tiny_model, model_id="q8", kv_bits=8, kv_group_size=32)
        w.load(tiny_model, model_id="rot", max_kv_size=64)
        base = {"max_tokens": 80, "temperature": 0, "ignore_eos": True}
        params = [{**base, "model_id": m, "prompt": prompt(i)} for i, m in
                  enumerate(["tiny", "q8", "rot", "tiny", "q8", "rot"])]
        alone_then_together(w, params, at_least=4)
    finally:
        w.close()

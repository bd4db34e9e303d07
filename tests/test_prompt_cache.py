"""Prompt (KV) cache reuse: the cache never changes the output, and
``cached_tokens`` is what the store holds.

Every comparison runs the same request with and without the cache in one
worker (greedy), and predicts ``cached_tokens`` from the tokens the store
keeps: the prompt plus every token the model produced, a terminating EOS
included, minus nothing (tokens that don't match a later prompt are trimmed
at reuse, and one prompt token is always processed).
"""

from __future__ import annotations

import os

import pytest

from conftest import logprob_entries, spawn
from mlx_worker import protocol
from mlx_worker.client import RpcError

CACHE_FILE_INVALID = -32009


def stored_key(prompt_tokens: list[int], result: protocol.GenerateResult) -> list[int]:
    """The tokens a finished request leaves in the store."""
    fed = list(result.tokens)
    if result.stop_reason == "eos":
        fed.append(result.stop_token)
    return list(prompt_tokens) + fed


def shared(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def expected_cached(key: list[int], prompt: list[int]) -> int:
    return min(shared(key, prompt), len(prompt) - 1)


class Session:
    """A worker with a model loaded afresh (an empty store)."""

    def __init__(self, worker, model_path: str, model_id: str = "m", **load_opts):
        self.w = worker
        self.model_id = model_id
        if any(m.model_id == model_id for m in worker.status().models):
            worker.unload(model_id)
        worker.load(model_path, model_id=model_id, **load_opts)

    def tokens(self, **source) -> list[int]:
        if "messages" in source:
            return self.w.tokenize(model_id=self.model_id, **source).tokens
        if "prompt" in source:
            return self.w.tokenize(model_id=self.model_id, text=source["prompt"]).tokens
        return list(source["tokens"])

    def run(self, **params) -> protocol.GenerateResult:
        params.setdefault("temperature", 0)
        stream = self.w.generate(model_id=self.model_id, **params)
        result = stream.wait()
        progress = [e for e in stream.events if isinstance(e, protocol.ProgressEvent)]
        assert all(p.cached == result.usage.cached_tokens for p in progress)
        return result

    def run_logged(self, **params) -> tuple[protocol.GenerateResult, list[float]]:
        params.setdefault("temperature", 0)
        stream = self.w.generate(model_id=self.model_id, logprobs=True, **params)
        result = stream.wait()
        progress = [e for e in stream.events if isinstance(e, protocol.ProgressEvent)]
        assert all(p.cached == result.usage.cached_tokens for p in progress)
        logprobs = [lp.logprob for lp in logprob_entries(stream.events)]
        return result, logprobs

    def both(self, **params) -> protocol.GenerateResult:
        """Cached run, then the same uncached: same greedy tokens, and the same
        log-probabilities (reuse is exact here: a state reused at the wrong
        point of a rotating cache shifts them by ~1e-3 even when the argmax
        survives)."""
        cached, lp_cached = self.run_logged(**params)
        cold, lp_cold = self.run_logged(prompt_cache=False, **params)
        assert cold.usage.cached_tokens == 0
        assert cached.tokens == cold.tokens, "the prompt cache changed the output"
        assert cached.stop_reason == cold.stop_reason
        assert cached.text == cold.text
        assert len(lp_cached) == len(lp_cold)
        assert max((abs(a - b) for a, b in zip(lp_cached, lp_cold)), default=0.0) < 1e-5
        return cached

    def cache_status(self) -> protocol.PromptCacheStatus:
        model = next(m for m in self.w.status().models if m.model_id == self.model_id)
        assert model.prompt_cache is not None
        return model.prompt_cache


@pytest.fixture(scope="module")
def cache_worker():
    w = spawn()
    yield w
    w.close()


@pytest.fixture
def s(cache_worker, tiny_model):
    return Session(cache_worker, tiny_model)


SYSTEM = {"role": "system", "content": "You are a helpful assistant who answers in short sentences."}


# ------------------------------------------------------------ reuse cases


def test_exact_repeat(s):
    prompt = "The lighthouse keeper counted the ships that passed in the night"
    first = s.both(prompt=prompt, max_tokens=24)
    assert first.usage.cached_tokens == 0
    n = len(s.tokens(prompt=prompt))
    again = s.both(prompt=prompt, max_tokens=24)
    assert again.usage.cached_tokens == n - 1  # one prompt token is always processed
    assert again.tokens == first.tokens


def test_chat_turn_extends_prompt_and_answer(s):
    chat = [SYSTEM, {"role": "user", "content": "Tell me about the sea."}]
    t1 = s.both(messages=chat, max_tokens=30)
    key = stored_key(s.tokens(messages=chat), t1)
    chat2 = chat + [{"role": "assistant", "content": t1.text}, {"role": "user", "content": "And the tides?"}]
    prompt2 = s.tokens(messages=chat2)
    t2 = s.both(messages=chat2, max_tokens=30)
    assert t2.usage.cached_tokens == expected_cached(key, prompt2)
    assert t2.usage.cached_tokens >= len(s.tokens(messages=chat))  # at least the whole first prompt
    # turn 3 continues from turn 2's entry
    key2 = stored_key(prompt2, t2)
    chat3 = chat2 + [{"role": "assistant", "content": t2.text}, {"role": "user", "content": "Thanks."}]
    t3 = s.both(messages=chat3, max_tokens=20)
    assert t3.usage.cached_tokens == expected_cached(key2, s.tokens(messages=chat3))
    assert t3.usage.cached_tokens >= len(prompt2)


def test_divergent_suffix(s):
    base = list(range(40, 140))
    a = s.both(tokens=base + [500, 501, 502, 503], max_tokens=16, ignore_eos=True)
    key_a = stored_key(base + [500, 501, 502, 503], a)
    b_prompt = base + [600, 601, 602]
    b = s.both(tokens=b_prompt, max_tokens=16, ignore_eos=True)
    assert b.usage.cached_tokens == expected_cached(key_a, b_prompt) == len(base)
    # a used only part of the stored entry, so the entry is intact: repeating a hits it whole
    again = s.both(tokens=base + [500, 501, 502, 503], max_tokens=16, ignore_eos=True)
    assert again.usage.cached_tokens == len(base) + 3
    assert again.tokens == a.tokens


def test_shorter_prompt(s):
    long = [7 + (i * 13) % 900 for i in range(300)]
    s.both(tokens=long, max_tokens=8, ignore_eos=True)
    short = long[:120]
    r = s.both(tokens=short, max_tokens=8, ignore_eos=True)
    assert r.usage.cached_tokens == 119


def test_interleaved_conversations_each_hit_their_own(s):
    topics = {"A": "the sea", "B": "mountains", "C": "old clocks"}
    chats = {
        name: [{"role": "system", "content": f"Conversation {name}: you only talk about {topic}."},
               {"role": "user", "content": f"What do you know about {topic}?"}]
        for name, topic in topics.items()
    }
    keys: dict[str, list[int]] = {}
    for name in ["A", "B", "A", "C", "B"]:
        chat = chats[name]
        prompt = s.tokens(messages=chat)
        result = s.both(messages=chat, max_tokens=12)
        if name in keys:
            assert result.usage.cached_tokens == expected_cached(keys[name], prompt)
            assert result.usage.cached_tokens > len(s.tokens(messages=chat[:2])) - 1
        else:
            assert result.usage.cached_tokens < 12  # at most the shared template head
        keys[name] = stored_key(prompt, result)
        chats[name] = chat + [{"role": "assistant", "content": result.text},
                              {"role": "user", "content": "Go on."}]
    assert s.cache_status().entries >= 3


def test_resume_after_cancelled_prompt(s):
    prompt = [9 + (i * 7) % 1000 for i in range(2400)]
    stream = s.w.generate(model_id=s.model_id, tokens=prompt, max_tokens=8, temperature=0,
                          ignore_eos=True, prefill_step_size=32)
    for event in stream:
        if isinstance(event, protocol.ProgressEvent) and event.processed >= 256:
            stream.cancel()
    assert stream.result.stop_reason == "cancelled"
    progress = [e for e in stream.events if isinstance(e, protocol.ProgressEvent)]
    done = progress[-1].processed
    assert 256 <= done < len(prompt), "the cancel should land during prompt processing"
    resumed = s.both(tokens=prompt, max_tokens=8, ignore_eos=True, prefill_step_size=32)
    assert resumed.usage.cached_tokens == done  # the processed chunks were kept


def test_after_a_stop_string(s):
    prompt = "Once upon a time, in a quiet village by the river,"
    cold = s.run(prompt=prompt, max_tokens=40, ignore_eos=True, prompt_cache=False)
    # a stop string the model will produce: a piece of its own output
    text = cold.text
    start = next(i for i in range(4, len(text) - 3) if text[i:i + 3].strip() and "\ufffd" not in text[i:i + 3])
    stop = text[start:start + 3]
    stopped = s.both(prompt=prompt, max_tokens=40, ignore_eos=True, stop=stop)
    assert stopped.stop_reason == "stop_string" and not stopped.text.endswith(stop)
    prompt_tokens = s.tokens(prompt=prompt)
    # by ids: the prompt, the tokens before the one that completed the stop string, new ones
    ids = prompt_tokens + stopped.tokens[:-1] + [300, 301, 302]
    by_ids = s.both(tokens=ids, max_tokens=12, ignore_eos=True)
    assert by_ids.usage.cached_tokens == len(ids) - 3
    # as text: the host continues from the text it got (cut before the stop string)
    follow = prompt + stopped.text + " and then"
    follow_tokens = s.tokens(prompt=follow)
    by_text = s.both(prompt=follow, max_tokens=20, ignore_eos=True)
    assert by_text.usage.cached_tokens == expected_cached(stored_key(ids, by_ids), follow_tokens)
    assert by_text.usage.cached_tokens > len(prompt_tokens) // 2


def test_penalties_identical_cached_and_uncached(s):
    chat = [SYSTEM, {"role": "user", "content": "List some colours, please, and some more colours."}]
    penalties = dict(repetition_penalty=1.3, repetition_context_size=64, frequency_penalty=0.4,
                     presence_penalty=0.3, max_tokens=40)
    t1 = s.both(messages=chat, **penalties)
    chat2 = chat + [{"role": "assistant", "content": t1.text}, {"role": "user", "content": "More."}]
    t2 = s.both(messages=chat2, **penalties)
    assert t2.usage.cached_tokens > len(s.tokens(messages=chat)) - 1
    t3 = s.both(messages=chat2, **penalties)
    assert t3.usage.cached_tokens == len(s.tokens(messages=chat2)) - 1


def test_prompt_cache_false_bypasses_the_store(s):
    before = s.cache_status()
    r = s.run(prompt="Nothing is stored for this one", max_tokens=5, prompt_cache=False)
    assert r.usage.cached_tokens == 0
    assert s.cache_status() == before
    r2 = s.run(prompt="Nothing is stored for this one", max_tokens=5)
    assert r2.usage.cached_tokens == 0


def test_unload_frees_the_store(cache_worker, tiny_model):
    s = Session(cache_worker, tiny_model, model_id="u")
    s.run(prompt="fill the cache " * 20, max_tokens=4)
    assert s.cache_status().entries == 1 and s.cache_status().bytes > 0
    cache_worker.unload("u")
    assert all(m.model_id != "u" for m in cache_worker.status().models)
    s = Session(cache_worker, tiny_model, model_id="u")
    assert s.cache_status().entries == 0
    r = s.run(prompt="fill the cache " * 20, max_tokens=4)
    assert r.usage.cached_tokens == 0
    cache_worker.unload("u")


def test_disabled_store(cache_worker, tiny_model):
    cache_worker.load(tiny_model, model_id="off", prompt_cache_bytes=0)
    model = next(m for m in cache_worker.status().models if m.model_id == "off")
    assert model.prompt_cache is None
    for _ in range(2):
        r = cache_worker.generate(model_id="off", prompt="no cache here", max_tokens=3, temperature=0).wait()
        assert r.usage.cached_tokens == 0
    with pytest.raises(RpcError) as err:
        cache_worker.load(tiny_model, model_id="neg", prompt_cache_entries=-1)
    assert err.value.code == -32602 and err.value.data["field"] == "params.prompt_cache_entries"
    cache_worker.unload("off")


# ------------------------------------------------------------ rotating cache


def test_max_kv_size_smaller_than_the_conversation(cache_worker, tiny_model):
    """A 64-token rotating cache, 16-token prefill chunks. Below the window any
    prefix is reusable; past it only states an uncached run would share:
    prefill chunk boundaries (multiples of 16), snapshotted during prefill."""
    s = Session(cache_worker, tiny_model, model_id="rot", max_kv_size=64, prefill_step_size=16)
    t1_prompt = [11 + (i * 17) % 900 for i in range(40)]
    t1 = s.both(tokens=t1_prompt, max_tokens=10, ignore_eos=True)
    key1 = stored_key(t1_prompt, t1)  # 50 tokens: below the window, trimmable
    assert t1.usage.cached_tokens == 0

    t2_prompt = key1 + [700 + i for i in range(20)]  # 70 tokens: the uncached run wraps
    t2 = s.both(tokens=t2_prompt, max_tokens=10, ignore_eos=True)
    assert t2.usage.cached_tokens == 48  # 50 shared, cut to a chunk boundary

    # t2 wrapped the window (80 tokens): what's kept is its prefill state at 64
    t3_prompt = stored_key(t2_prompt, t2) + [800 + i for i in range(10)]
    t3 = s.both(tokens=t3_prompt, max_tokens=10, ignore_eos=True)
    assert t3.usage.cached_tokens == 64

    # another chunking can't reuse a wrapped state (t3's snapshot at 80 was made
    # in steps of 16; t1's unwrapped entry was taken over by t2): recomputed
    t3b = s.both(tokens=t3_prompt, max_tokens=10, ignore_eos=True, prefill_step_size=32)
    assert t3b.usage.cached_tokens == 0

    # within the window any prefix is reusable
    short = [900 - i for i in range(30)]
    assert s.both(tokens=short, max_tokens=10, ignore_eos=True).usage.cached_tokens == 0
    assert s.both(tokens=short, max_tokens=10, ignore_eos=True).usage.cached_tokens == 29
    cache_worker.unload("rot")


def test_max_kv_size_chat_with_a_system_prompt(cache_worker, tiny_model):
    s = Session(cache_worker, tiny_model, model_id="rotchat", max_kv_size=96, prefill_step_size=16)
    chat = [SYSTEM, {"role": "user", "content": "Tell me a long story about a fox and a crow."}]
    hits = 0
    for turn in range(4):
        r = s.both(messages=chat, max_tokens=24)
        hits += r.usage.cached_tokens > 0
        chat = chat + [{"role": "assistant", "content": r.text}, {"role": "user", "content": f"Continue ({turn})."}]
    assert len(s.tokens(messages=chat)) > 96
    assert hits >= 1
    cache_worker.unload("rotchat")


# ------------------------------------------------------------ budget


def test_byte_budget_is_never_exceeded(cache_worker, tiny_model):
    budget = 2_000_000  # tiny-llama: 2 KiB per token, buffers grow in 256-token steps
    s = Session(cache_worker, tiny_model, model_id="budget", prompt_cache_bytes=budget, prompt_cache_entries=5)
    peak_entries = 0
    for i in range(14):
        prompt = [(i * 31 + j * 7) % 1000 + 5 for j in range(40 + (i * 97) % 600)]
        s.run(tokens=prompt, max_tokens=4, ignore_eos=True)
        status = s.cache_status()
        assert status.bytes <= status.max_bytes == budget
        assert status.entries <= status.max_entries == 5
        peak_entries = max(peak_entries, status.entries)
    assert status.entries >= 1 and peak_entries >= 2
    # an entry bigger than the whole budget is simply not kept
    s.run(tokens=[5 + j % 900 for j in range(1500)], max_tokens=2, ignore_eos=True)
    assert s.cache_status().bytes <= budget
    cache_worker.unload("budget")


# ------------------------------------------------------------ files


def test_save_then_load_in_another_process(tmp_path, tiny_model):
    path = str(tmp_path / "system.safetensors")
    head = [SYSTEM, {"role": "user", "content": "Remember the number forty-two."}]
    chat = head + [{"role": "assistant", "content": "I will."}, {"role": "user", "content": "Which number?"}]
    with spawn() as a:
        a.load(tiny_model, model_id="m")
        saved = a.call("cache_save", {"model_id": "m", "messages": head, "path": path,
                                      "add_generation_prompt": False})
        n_head = len(a.tokenize(model_id="m", messages=head, add_generation_prompt=False).tokens)
        assert saved["tokens"] == saved["prompt_tokens"] == n_head and saved["cached_tokens"] == 0
        assert os.path.getsize(path) == saved["file_bytes"] > 0
        # saving again reuses the store
        again = a.call("cache_save", {"model_id": "m", "messages": head, "path": path,
                                      "add_generation_prompt": False})
        assert again["cached_tokens"] == n_head - 1
        cold = a.generate(model_id="m", messages=chat, max_tokens=20, temperature=0, prompt_cache=False).wait()
    with spawn() as b:
        b.load(tiny_model, model_id="m")
        loaded = b.call("cache_load", {"path": path})
        assert loaded["tokens"] == n_head and loaded["model_id"] == "m" and loaded["bytes"] > 0
        status = next(m for m in b.status().models).prompt_cache
        assert status.entries == 1 and status.bytes == loaded["bytes"]
        warm = b.generate(model_id="m", messages=chat, max_tokens=20, temperature=0).wait()
        assert warm.usage.cached_tokens == n_head
        assert warm.tokens == cold.tokens


def test_save_plain_tokens_and_prefill_progress(tmp_path, cache_worker, tiny_model):
    s = Session(cache_worker, tiny_model, model_id="save")
    tokens = [20 + i % 700 for i in range(300)]
    path = str(tmp_path / "t.safetensors")
    saved = cache_worker.call("cache_save", {"model_id": "save", "tokens": tokens, "path": path,
                                             "prefill_step_size": 64})
    assert saved["tokens"] == 300 and saved["cached_tokens"] == 0
    r = s.both(tokens=tokens + [1, 2, 3], max_tokens=5, ignore_eos=True)
    assert r.usage.cached_tokens == 300
    with pytest.raises(RpcError) as err:
        cache_worker.call("cache_save", {"model_id": "save", "tokens": tokens, "path": str(tmp_path / "x.bin")})
    assert err.value.code == -32602 and err.value.data["field"] == "params.path"
    cache_worker.unload("save")


def test_mismatched_or_corrupt_files_are_refused(tmp_path, cache_worker, tiny_model):
    from fixtures.build import ensure_model

    s = Session(cache_worker, tiny_model, model_id="src")
    good = str(tmp_path / "good.safetensors")
    cache_worker.call("cache_save", {"model_id": "src", "prompt": "a prompt to save " * 5, "path": good})
    other = Session(cache_worker, str(ensure_model("tiny-llama-32k")), model_id="other")
    rotating = Session(cache_worker, tiny_model, model_id="rot", max_kv_size=64)

    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + os.urandom(256))
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data.replace(b"mlx-worker-prompt-cache/1", b"mlx-worker-prompt-cache/X"))

    cases = [
        ("other", good, "another model"),
        ("rot", good, "layout"),
        ("src", str(truncated), "readable"),
        ("src", str(garbage), "readable"),
        ("src", str(flipped), "not a prompt cache"),
        ("src", str(tmp_path / "missing.safetensors"), "not found"),
    ]
    for model_id, path, why in cases:
        with pytest.raises(RpcError) as err:
            cache_worker.call("cache_load", {"model_id": model_id, "path": path})
        assert err.value.code == CACHE_FILE_INVALID, (model_id, path, err.value)
        assert why in err.value.message
        assert err.value.data["path"].endswith(os.path.basename(path))
    # nothing was added, and every model still serves
    assert other.cache_status().entries == 0 and rotating.cache_status().entries == 0
    for sess in (s, other, rotating):
        assert len(sess.run(prompt="still alive", max_tokens=3, ignore_eos=True).tokens) == 3
    loaded = cache_worker.call("cache_load", {"model_id": "src", "path": good})
    assert loaded["tokens"] > 0
    for model_id in ("src", "other", "rot"):
        cache_worker.unload(model_id)

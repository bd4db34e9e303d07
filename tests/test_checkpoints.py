"""Prompt-cache checkpoints on hybrid, state-space and sliding-window models.

Their caches can't be cut back (recurrent state, a wrapped window), so the
store keeps checkpoints where a chat continues. Each case runs a sampled
(temperature > 0, seeded) two-turn chat at the default prefill_step_size
through a real worker, on a tiny random folder built with mlx-lm's own
model class (fixtures/hybrid.py; windows of 8-16 tokens, far shorter than
the chat), and checks:

* re-sending the turn-1 prompt, turn 2 (history + the generated answer + a
  new message), an edited last message and a regenerated answer each
  reuse >= 90 % of the turn-1 prompt (``usage.cached_tokens``);
* every cached run's tokens equal a cold run's (``prompt_cache: false``),
  and, the fixtures being float32, each token's logprob within 1e-4
  (the spec's *Numerics per dtype*; bf16 and 4-bit conversions within
  theirs).

Also: concurrent turns, a shared system prompt, a third turn, a long prompt
edited near its end, a cancel during prompt processing, cache files with
checkpoints (and a corrupt checkpoint table), the bytes a checkpoint costs,
and speculative decoding's refusal of these caches.
"""

from __future__ import annotations

import pytest

from conftest import ensure_model, logprob_entries, spawn
from fixtures.hybrid import ARCHS
from mlx_worker import protocol
from numerics import assert_same_output

SYSTEM = ("You are a careful assistant. Answer in full sentences, cite the numbers you use, "
          "and say when you are unsure. ") * 3
QUESTION = ("Here are the monthly figures: 12, 17, 9, 23, 31, 8 and 14. Which month grew the most "
            "over the one before, and by how much? Explain the steps you took.")
FOLLOW_UP = "Now do the same for the quarter totals, and compare the two answers."
EDITED = "Now do the same for the weekly averages instead, please."
LOGPROB_TOL = 1e-4  # float32 activations


def chat(answer: str | None = None, last: str = FOLLOW_UP) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    if answer is not None:
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": last}]
    return messages


@pytest.fixture(scope="module")
def w():
    worker = spawn()
    yield worker
    worker.close()


def run(w, model_id: str, messages: list[dict], seed: int, **params) -> tuple[protocol.GenerateResult, list[float]]:
    stream = w.generate(model_id=model_id, messages=messages, temperature=0.8, seed=seed, max_tokens=12,
                        logprobs=True, **params)
    result = stream.wait()
    logprobs = [lp.logprob for lp in logprob_entries(stream.events)]
    return result, logprobs


def same_as_cold(w, model_id: str, messages: list[dict], seed: int, cached) -> None:
    result, logprobs = cached
    cold, cold_logprobs = run(w, model_id, messages, seed, prompt_cache=False)
    assert cold.usage.cached_tokens == 0
    assert result.tokens == cold.tokens, (model_id, result.usage)
    assert len(logprobs) == len(cold_logprobs)
    assert max((abs(a - b) for a, b in zip(logprobs, cold_logprobs)), default=0.0) <= LOGPROB_TOL


@pytest.mark.parametrize("name", list(ARCHS))
def test_two_turn_chat_reuses_checkpoints(w, name):
    w.load(str(ensure_model(name)), model_id=name)
    try:
        n1 = len(w.tokenize(model_id=name, messages=chat()).tokens)
        first = run(w, name, chat(), seed=1)
        assert first[0].usage.cached_tokens == 0
        need = 0.9 * n1

        # The same prompt again (same seed): all but its last token come from the cache.
        again = run(w, name, chat(), seed=1)
        assert again[0].usage.cached_tokens == n1 - 1
        assert again[0].tokens == first[0].tokens

        # Turn 2: history + the sampled answer + a new message.
        answer = first[0].text
        second = run(w, name, chat(answer), seed=2)
        assert second[0].usage.cached_tokens >= need, (second[0].usage, n1)
        same_as_cold(w, name, chat(answer), 2, second)

        # The last message edited, and turn 2 regenerated with another seed.
        edited = run(w, name, chat(answer, EDITED), seed=3)
        assert edited[0].usage.cached_tokens >= need, (edited[0].usage, n1)
        same_as_cold(w, name, chat(answer, EDITED), 3, edited)
        n2 = second[0].usage.prompt_tokens
        regenerated = run(w, name, chat(answer), seed=4)
        assert regenerated[0].usage.cached_tokens == n2 - 1
        same_as_cold(w, name, chat(answer), 4, regenerated)
        stored = w.status().models[0].prompt_cache
        assert stored is not None and stored.entries >= 1 and 0 < stored.bytes <= stored.max_bytes
    finally:
        w.unload(name)


@pytest.mark.parametrize("name", ["tiny-qwen3-5", "tiny-gemma3-w8", "tiny-nemotron-h"])
def test_concurrent_turns_reuse_checkpoints(w, name):
    """Several chats at once (each such request decodes in its own group,
    interleaved with the others): every one resumes from its checkpoint and
    gives a cold run's tokens."""
    w.load(str(ensure_model(name)), model_id=name)
    try:
        n1 = len(w.tokenize(model_id=name, messages=chat()).tokens)
        answer = run(w, name, chat(), seed=1)[0].text
        lasts = [FOLLOW_UP, EDITED, "And what about the median?"]
        streams = [w.generate(model_id=name, messages=chat(answer, last), temperature=0.8, seed=10 + i,
                              max_tokens=12, logprobs=True) for i, last in enumerate(lasts)]
        for i, (last, stream) in enumerate(zip(lasts, streams)):
            result = stream.wait()
            logprobs = [lp.logprob for lp in logprob_entries(stream.events)]
            assert result.usage.cached_tokens >= 0.9 * n1, (last, result.usage)
            same_as_cold(w, name, chat(answer, last), 10 + i, (result, logprobs))
    finally:
        w.unload(name)


@pytest.mark.parametrize("name", ["tiny-qwen3-5", pytest.param("tiny-gpt-oss", marks=pytest.mark.heavy),
                                  pytest.param("tiny-falcon-h1", marks=pytest.mark.heavy)])
def test_cache_file_keeps_checkpoints(tmp_path, name):
    """cache_save writes the checkpoints with the state; a fresh worker that
    loads the file resumes both the same prompt and its next turn."""
    path = ensure_model(name)
    file = tmp_path / "chat.safetensors"
    with spawn() as a:
        a.load(str(path), model_id=name)
        saved = a.call("cache_save", {"model_id": name, "path": str(file), "messages": chat()})
        n1 = saved["prompt_tokens"]
        assert saved["tokens"] == n1
        warm = run(a, name, chat(), seed=5)
    with spawn() as b:
        b.load(str(path), model_id=name)
        b.call("cache_load", {"model_id": name, "path": str(file)})
        again = run(b, name, chat(), seed=5)
        assert again[0].usage.cached_tokens == n1 - 1
        assert again[0].tokens == warm[0].tokens
        second = run(b, name, chat(warm[0].text), seed=6)
        assert second[0].usage.cached_tokens >= n1 - 1
        same_as_cold(b, name, chat(warm[0].text), 6, second)


def test_speculative_pairs_refuse_these_caches(w):
    """Speculative decoding can't take back rejected draft tokens from
    recurrent state or a window: a precise refusal, as the spec says."""
    w.load(str(ensure_model("tiny-qwen3-5")), model_id="hybrid")
    try:
        with pytest.raises(Exception) as info:
            w.generate(model_id="hybrid", messages=chat(), max_tokens=4, draft_model_id="hybrid").wait()
        assert "ArraysCache" in str(info.value) or "plain KV" in str(info.value)
    finally:
        w.unload("hybrid")


def test_checkpoint_bytes_are_counted(fresh_worker):
    """A recurrent model's entry after one chat request: its own state plus
    two checkpoints (where the system prompt ends, where the prompt ends),
    all in the store's bytes. The state's size comes from mlx-lm's own cache
    for the same folder."""
    import mlx.core as mx
    from mlx_lm import load

    path = ensure_model("tiny-mamba2")
    model, _ = load(str(path))
    cache = model.make_cache()
    model(mx.array([[5, 6, 7]]), cache=cache)
    state = sum(a.nbytes for c in cache for a in c.cache if a is not None)
    fresh_worker.load(str(path), model_id="ssm")
    run(fresh_worker, "ssm", chat(), seed=1)
    stored = fresh_worker.status().models[0].prompt_cache
    assert stored.entries == 1
    assert (stored.checkpoints, stored.checkpoint_bytes) == (2, 2 * state)
    assert stored.bytes == 3 * state


@pytest.mark.parametrize("name", ["tiny-qwen3-next", "tiny-olmo3", "tiny-jamba"])
def test_shared_system_prompt_and_third_turn(w, name):
    """Another conversation with the same system prompt resumes where the
    system prompt ends (prefill stops there for a checkpoint); a third turn
    resumes after the second."""
    w.load(str(ensure_model(name)), model_id=name)
    try:
        system = chat()[:1]
        n_sys = len(w.tokenize(model_id=name, messages=system, add_generation_prompt=False).tokens)
        first = run(w, name, chat(), seed=1)[0]
        other = system + [{"role": "user", "content": "A different question about the weather in spring."}]
        result = run(w, name, other, seed=2)
        assert result[0].usage.cached_tokens == n_sys
        same_as_cold(w, name, other, 2, result)

        turn2 = chat(first.text)
        second = run(w, name, turn2, seed=3)[0]
        turn3 = turn2 + [{"role": "assistant", "content": second.text},
                         {"role": "user", "content": "Thanks. One last check of the totals?"}]
        third = run(w, name, turn3, seed=4)
        assert third[0].usage.cached_tokens >= second.usage.prompt_tokens - 1
        same_as_cold(w, name, turn3, 4, third)
    finally:
        w.unload(name)


@pytest.mark.parametrize("name,dtype", [("tiny-qwen3-5-bf16", "bf16"), ("tiny-qwen3-5-q4", "quantized"),
                                        ("tiny-gemma3-w8-bf16", "bf16"), ("tiny-gemma3-w8-q4", "quantized")])
def test_numerics_per_dtype(w, name, dtype):
    """bf16 and 4-bit conversions: the same prompt again and turn 2 resume
    from checkpoints, within the spec's tolerance of a cold run."""
    w.load(str(ensure_model(name)), model_id=name)
    try:
        n1 = len(w.tokenize(model_id=name, messages=chat()).tokens)

        def greedy(messages, **params):
            stream = w.generate(model_id=name, messages=messages, temperature=0, max_tokens=8, top_logprobs=3,
                                **params)
            result = stream.wait()
            return result, [e for e in stream.events if isinstance(e, protocol.TokenEvent) and e.tokens]

        first = greedy(chat())
        for messages in (chat(), chat(first[0].text)):
            cached = greedy(messages)
            assert cached[0].usage.cached_tokens >= 0.9 * n1, cached[0].usage
            cold = greedy(messages, prompt_cache=False)
            assert_same_output(dtype, cached[0], cold[0], cached[1], cold[1])
    finally:
        w.unload(name)


def test_cache_file_with_a_bad_checkpoint_table_is_refused(tmp_path):
    """A file whose checkpoint table doesn't fit its tokens or layers is a
    cache-file error (-32009); the worker keeps serving."""
    import mlx.core as mx

    from mlx_worker.client import RpcError

    path = ensure_model("tiny-qwen3-5")
    good = tmp_path / "good.safetensors"
    with spawn() as w:
        w.load(str(path), model_id="m")
        w.call("cache_save", {"model_id": "m", "path": str(good), "messages": chat()})
        arrays, meta = mx.load(str(good), return_metadata=True)
        for i, table in enumerate(['[[99999, [0]]]', '[[5, [1]]]', 'not json']):
            bad = tmp_path / f"bad{i}.safetensors"
            assert "0.checkpoints" in meta  # mlx-lm flattens [metadata, classes, scalars]
            mx.save_safetensors(str(bad), arrays, {**meta, "0.checkpoints": table})
            with pytest.raises(RpcError) as refused:
                w.call("cache_load", {"model_id": "m", "path": str(bad)})
            assert refused.value.code == -32009 and "checkpoint" in refused.value.message
        assert run(w, "m", chat(), seed=1)[0].usage.cached_tokens > 0  # the saved entry is still there


@pytest.mark.parametrize("name", ["tiny-qwen3-5", "tiny-gemma3-w8"])
def test_long_prompt_edited_near_its_end_resumes_at_a_chunk_end(w, name):
    """A prompt longer than one prefill chunk (default 512) keeps a
    checkpoint where its last chunk ended; editing its end resumes there.
    Chunks start where the system prompt ends (a checkpoint of its own)."""
    w.load(str(ensure_model(name)), model_id=name)
    try:
        system = chat()[:1]
        n_sys = len(w.tokenize(model_id=name, messages=system, add_generation_prompt=False).tokens)
        long_text = " ".join(f"item {i} costs {i * 7 % 100} units" for i in range(40))
        first = system + [{"role": "user", "content": long_text + " What is the total?"}]
        edited = system + [{"role": "user", "content": long_text + " Which item is the cheapest?"}]
        n = len(w.tokenize(model_id=name, messages=first).tokens)
        assert n_sys + 512 + 10 < n < n_sys + 1024  # one full chunk after the system prompt, then the rest
        run(w, name, first, seed=1)
        result = run(w, name, edited, seed=2)
        assert result[0].usage.cached_tokens == n_sys + 512
        same_as_cold(w, name, edited, 2, result)
    finally:
        w.unload(name)


def test_window_checkpoint_holds_one_window(fresh_worker):
    """A sliding-window checkpoint copies each window layer's last
    ``sliding_window`` tokens of KV (not the prefill buffer, which holds the
    whole chunk): its bytes follow from config.json."""
    import json

    path = ensure_model("tiny-gemma3-w8")
    cfg = json.loads((path / "config.json").read_text())
    pattern = cfg["sliding_window_pattern"]
    window_layers = sum(1 for i in range(cfg["num_hidden_layers"]) if i % pattern != pattern - 1)
    per_checkpoint = window_layers * cfg["sliding_window"] * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 4
    fresh_worker.load(str(path), model_id="win")
    run(fresh_worker, "win", chat(), seed=1)
    stored = fresh_worker.status().models[0].prompt_cache
    assert stored.checkpoints == 2  # the system prompt's end, the prompt's end
    assert stored.checkpoint_bytes == 2 * per_checkpoint


@pytest.mark.parametrize("name", ["tiny-qwen3-5", "tiny-mamba2"])
def test_cancel_during_prompt_processing_keeps_the_chunks(w, name):
    """Cancelled between prefill chunks: the state at the last chunk is kept
    (it is exactly that position's), so a retry resumes there."""
    w.load(str(ensure_model(name)), model_id=name)
    try:
        text = " ".join(f"line {i}: the value is {i * 13 % 97}." for i in range(40))
        messages = [{"role": "user", "content": text}]
        n = len(w.tokenize(model_id=name, messages=messages).tokens)
        stream = w.generate(model_id=name, messages=messages, max_tokens=4, prefill_step_size=64)
        for event in stream:
            if isinstance(event, protocol.ProgressEvent) and event.processed >= 128:
                stream.cancel()
                break
        result = stream.wait()
        assert result.stop_reason == "cancelled"
        retry = run(w, name, messages, seed=1, prefill_step_size=64)
        assert 128 <= retry[0].usage.cached_tokens < n - 1
        assert retry[0].usage.cached_tokens % 64 == 0
        same_as_cold(w, name, messages, 1, retry)
    finally:
        w.unload(name)


def test_cache_file_with_forged_checkpoint_layers_is_refused(tmp_path):
    """A checkpoint whose copied layers don't fit the model (a state of the
    wrong shape, a window of another size, keep or position) or whose table leaves
    out a layer that can't be cut back (it would resume from the final
    state) is a cache-file error (-32009), as the cache's own layers are."""
    import json

    import mlx.core as mx

    from mlx_worker.client import RpcError

    def forged(w, name: str, good, cases, word: str = "checkpoint") -> None:
        arrays, meta = mx.load(str(good), return_metadata=True)
        for i, (changes, table) in enumerate(cases):
            bad = tmp_path / f"{name}-{i}.safetensors"
            mx.save_safetensors(str(bad), {**arrays, **changes}, {**meta, "0.checkpoints": table or meta["0.checkpoints"]})
            with pytest.raises(RpcError) as refused:
                w.call("cache_load", {"model_id": name, "path": str(bad)})
            assert refused.value.code == -32009 and word in refused.value.message, (i, refused.value)
        w.call("cache_load", {"model_id": name, "path": str(good)})  # the untouched file loads

    with spawn() as w:
        for name in ("tiny-qwen3-5", "tiny-gemma3-w8"):
            w.load(str(ensure_model(name)), model_id=name)
            good = tmp_path / f"{name}.safetensors"
            w.call("cache_save", {"model_id": name, "path": str(good), "messages": chat()})
            arrays, meta = mx.load(str(good), return_metadata=True)
            table = json.loads(meta["0.checkpoints"])
            first = len([k for k in meta if k.startswith("1.")]) - sum(len(which) for _, which in table)
            if name == "tiny-qwen3-5":  # recurrent: an SSM state cut short; a recurrent layer left out
                state = f"{first}.0.1"
                omitted = json.dumps([[pos, which[:1]] for pos, which in table for _ in which])
                forged(w, name, good, [({state: arrays[state][..., :8]}, None), ({}, omitted)])
            else:  # a window checkpoint (keys, values, offset, keep, max_size, _idx) of another size or position
                forged(w, name, good, [({f"{first}.4": mx.array(64)}, None), ({f"{first}.3": mx.array(2)}, None),
                                       ({f"{first}.2": mx.array(table[0][0] + 5)}, None)])
                forged(w, name, good, [({"0.3": mx.array(2)}, None)], word="layout")  # the cache's own window's keep
            assert run(w, name, chat(), seed=1)[0].usage.cached_tokens > 0

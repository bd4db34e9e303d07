"""The properties that matter, on every text checkpoint layout users load.

Fixtures: fp32 (tiny-llama), bf16, 4-bit, 8-bit and mixed 3/6-bit conversions
made with mlx-lm's own converter (bf16 scales, as community conversions of
bf16 checkpoints have), and a sliding-window family (gemma3 text: local layers
with a 16-token window, which every prompt here crosses) and a recurrent one
(mamba: state that can't be trimmed).

The reference is mlx-lm itself on the same checkpoint with the same prompt
tokens, in a child process bound to the worker's BLAS (tests/reference.py). What is guaranteed per dtype is stated in
protocol/README.md ("Numerics per dtype") and tested here as stated.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

import reference
from conftest import spawn
from fixtures.build import ensure_model
from mlx_worker import protocol
from mlx_worker.client import RpcError
from numerics import assert_same_output

# fixture -> dtype class of its activations (the guarantees differ per class).
TEXT_FIXTURES = {
    "tiny-llama": "fp32",
    "tiny-llama-bf16": "bf16",
    "tiny-llama-q4": "quantized",
    "tiny-llama-q8": "quantized",
    "tiny-llama-mixed": "quantized",
    "tiny-gemma3": "fp32",
    "tiny-mamba": "fp32",
}

CHAT = [{"role": "user", "content": "Tell me about the sea and the city, the tree and the farm."}]
LONG = "The model writes a stream of tokens to the host, one line at a time. " * 3  # > 16-token window
CANCEL_REFERENCE = 200  # tokens of the uninterrupted run a cancelled one is compared with


@pytest.fixture(scope="module", params=list(TEXT_FIXTURES))
def fx(request):
    """(name, dtype class, path, worker with the fixture loaded as "m", mlx-lm's tokens)."""
    name = request.param
    path = str(ensure_model(name))
    w = spawn()
    w.load(path, model_id="m")
    prompts = {"chat": prompt_ids(w), "long": w.tokenize(model_id="m", text=LONG).tokens}
    jobs = [{"prompt": ids, "max_tokens": 24, "eos": True} for ids in prompts.values()]
    jobs.append({"prompt": prompts["chat"], "max_tokens": CANCEL_REFERENCE, "eos": False})
    chat, long, uninterrupted = reference.run("text", path, jobs)
    expected = {"chat": chat, "long": long, "uninterrupted": uninterrupted}
    yield name, TEXT_FIXTURES[name], path, w, prompts, expected
    w.close()


def run(w, **params):
    stream = w.generate(model_id="m", **params)
    events = list(stream)
    token_events = [e for e in events if isinstance(e, protocol.TokenEvent)]
    return stream.result, token_events


def prompt_ids(w) -> list[int]:
    return w.tokenize(model_id="m", messages=CHAT).tokens


def test_greedy_tokens_equal_mlx_lm(fx):
    _, _, _, w, prompts, expected = fx
    for which in ("chat", "long"):
        got = w.generate(model_id="m", tokens=prompts[which], max_tokens=24, temperature=0, prompt_cache=False).wait()
        assert got.tokens == expected[which], which
        assert len(set(got.tokens)) > 3  # a model that says something (not one token repeated)


def test_streamed_text_is_the_detokenized_continuation(fx):
    _, _, _, w, _, _ = fx
    ids = prompt_ids(w)
    result, events = run(w, tokens=ids, max_tokens=30, temperature=0, ignore_eos=True, prompt_cache=False)
    assert "".join(e.text for e in events) == result.text
    assert [t for e in events for t in e.tokens] == result.tokens
    assert w.detokenize(ids + result.tokens, model_id="m") == w.detokenize(ids, model_id="m") + result.text


def test_stop_string(fx):
    _, _, _, w, _, _ = fx
    ids = prompt_ids(w)
    full = w.generate(model_id="m", tokens=ids, max_tokens=40, temperature=0, ignore_eos=True,
                      prompt_cache=False).wait()
    # A stop string of two ASCII characters the model wrote, taken after its first few tokens.
    text = full.text
    at = next((i for i in range(3, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].strip()), None)
    if at is None:
        pytest.fail(f"no ASCII pair in the greedy output {text!r}: pick another prompt for this fixture")
    stop = text[at:at + 2]
    result, events = run(w, tokens=ids, max_tokens=40, temperature=0, ignore_eos=True, prompt_cache=False, stop=[stop])
    cut = text.index(stop)
    assert result.stop_reason == "stop_string" and result.stop_string == stop
    assert result.text == text[:cut] == "".join(e.text for e in events)
    assert result.tokens == full.tokens[: len(result.tokens)]


def test_cancel(fx):
    _, _, _, w, prompts, expected = fx
    stream = w.generate(model_id="m", tokens=prompts["chat"], max_tokens=3000, temperature=0, ignore_eos=True,
                        prompt_cache=False)
    for event in stream:
        if isinstance(event, protocol.TokenEvent):
            assert stream.cancel() is True
            break
    result = stream.wait()
    assert result.stop_reason == "cancelled"
    assert 0 < len(result.tokens) < 3000
    n = min(len(result.tokens), CANCEL_REFERENCE)
    assert result.tokens[:n] == expected["uninterrupted"][:n]  # what it gave, it gave right
    assert len(w.generate(model_id="m", prompt="still here", max_tokens=3, ignore_eos=True).wait().tokens) == 3


def test_cached_equals_uncached(fx):
    """A follow-up turn served from the prompt cache gives what a cold run gives,
    to the per-dtype guarantee in protocol/README.md ("Numerics per dtype").
    The follow-up extends the first turn's tokens exactly (what recurrent state
    needs); steps of 16 give the sliding-window model reusable chunk boundaries."""
    _, dtype, _, w, prompts, _ = fx
    first = w.generate(model_id="m", tokens=prompts["chat"], max_tokens=12, temperature=0, ignore_eos=True,
                       prefill_step_size=16).wait()
    turn = prompts["chat"] + first.tokens + w.tokenize(model_id="m", text="\nAnd then what?").tokens
    params = dict(tokens=turn, max_tokens=16, temperature=0, ignore_eos=True, top_logprobs=2, prefill_step_size=16)
    cached, cached_events = run(w, **params)
    cold, cold_events = run(w, **params, prompt_cache=False)
    assert cached.usage.cached_tokens > 0 and cold.usage.cached_tokens == 0
    assert_same_output(dtype, cached, cold, cached_events, cold_events)


def test_cached_chat_turn_equals_uncached(fx):
    """The next chat turn, rendered from messages (the answer re-tokenized)."""
    name, dtype, _, w, _, _ = fx
    first = w.generate(model_id="m", messages=CHAT, max_tokens=12, temperature=0, prefill_step_size=16).wait()
    turn = CHAT + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then what?"}]
    params = dict(messages=turn, max_tokens=16, temperature=0, ignore_eos=True, top_logprobs=2, prefill_step_size=16)
    cached, cached_events = run(w, **params)
    cold, cold_events = run(w, **params, prompt_cache=False)
    assert cached.usage.cached_tokens > 0 and cold.usage.cached_tokens == 0
    assert_same_output(dtype, cached, cold, cached_events, cold_events)


@pytest.mark.heavy
def test_prefill_chunking_within_the_dtype_tolerance(fx):
    name, dtype, _, w, prompts, expected = fx
    params = dict(tokens=prompts["chat"], max_tokens=16, temperature=0, ignore_eos=True, top_logprobs=2,
                  prompt_cache=False)
    whole, whole_events = run(w, **params)
    chunked, chunked_events = run(w, **params, prefill_step_size=5)
    assert_same_output(dtype, chunked, whole, chunked_events, whole_events)


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


def test_constraint_output_validates(fx):
    _, _, _, w, _, _ = fx
    result = w.generate(model_id="m", messages=CHAT, max_tokens=60, temperature=0,
                        constraint={"type": "json_schema", "schema": SCHEMA}).wait()
    assert result.constraint_complete is True, result.text
    jsonschema.validate(json.loads(result.text), SCHEMA)


@pytest.mark.heavy
def test_memory_estimate_bounds_the_measured_peak(fx):
    """The admission estimate (read from a refusal under a limit just above the
    weights) is at least what the same request then measures in a worker of
    its own: peak_memory over the model's own memory."""
    _, dtype, path, *_ = fx
    weights = sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
    cases = ((300, 128), (1500, 512)) if dtype == "fp32" else ((300, 128),)  # bf16 is slow on CPU
    for n_prompt, step in cases:
        params = dict(tokens=[7 + i % 900 for i in range(n_prompt)], max_tokens=20, temperature=0,
                      ignore_eos=True, prompt_cache=False, prefill_step_size=step)
        with spawn() as w:
            w.load(path, model_id="probe", memory_limit=weights + 1)
            with pytest.raises(RpcError) as refused:
                w.generate(model_id="probe", **params).wait()
            needed = refused.value.data["needed"]
        with spawn() as w:
            loaded = w.load(path, model_id="m")
            result = w.generate(model_id="m", **params).wait()
        assert result.peak_memory <= loaded.memory_bytes + needed, (n_prompt, result.peak_memory, loaded.memory_bytes, needed)

"""generate through a real worker: streaming, determinism, stops, logprobs."""

from __future__ import annotations

import math

import msgspec
import pytest

from conftest import logprob_entries
from mlx_worker import protocol

CHAT = [{"role": "user", "content": "Tell me about the sea."}]


def run(worker, **params):
    stream = worker.generate(model_id="tiny", **params)
    events = list(stream)
    return stream.result, events


def tokens_of(events):
    return [t for e in events if isinstance(e, protocol.TokenEvent) for t in e.tokens]


def text_of(events):
    return "".join(e.text for e in events if isinstance(e, protocol.TokenEvent))


def test_streamed_events_add_up_to_the_result(worker):
    result, events = run(worker, prompt="Once upon a time", max_tokens=40, temperature=0)
    assert isinstance(events[-1], protocol.GenerateResult)
    assert text_of(events) == result.text
    assert tokens_of(events) == result.tokens
    assert result.usage.completion_tokens == len(result.tokens)
    assert {e.id for e in events[:-1]} == {stream_id(events)}


def stream_id(events):
    return events[0].id


def test_progress_comes_before_tokens_and_reaches_total(worker):
    result, events = run(worker, prompt="The quick brown fox " * 20, max_tokens=3, temperature=0,
                         prefill_step_size=16)
    progress = [e for e in events if isinstance(e, protocol.ProgressEvent)]
    first_token = next(i for i, e in enumerate(events) if isinstance(e, protocol.TokenEvent))
    assert progress and events.index(progress[0]) < first_token
    assert progress[-1].processed == progress[-1].total == result.usage.prompt_tokens
    assert len(progress) >= result.usage.prompt_tokens // 16  # one per chunk
    assert [p.processed for p in progress] == sorted(p.processed for p in progress)


def test_text_is_the_exact_continuation(worker):
    prompt = "Hello world, this is"
    result, _ = run(worker, prompt=prompt, max_tokens=30, temperature=0)
    prompt_ids = worker.tokenize(model_id="tiny", text=prompt).tokens
    whole = worker.detokenize(prompt_ids + result.tokens, model_id="tiny")
    assert whole == prompt + result.text


def test_greedy_is_deterministic(worker):
    a, _ = run(worker, prompt="Determinism", max_tokens=30, temperature=0)
    b, _ = run(worker, prompt="Determinism", max_tokens=30, temperature=0, seed=123)
    assert a.tokens == b.tokens and len(a.tokens) == 30


def test_seed_reproduces_sampling(worker):
    a, _ = run(worker, prompt="Seeded", max_tokens=30, temperature=1.0, seed=7)
    b, _ = run(worker, prompt="Seeded", max_tokens=30, temperature=1.0, seed=7)
    c, _ = run(worker, prompt="Seeded", max_tokens=30, temperature=1.0, seed=8)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert a.seed == 7
    # an unseeded run reports the seed it drew, which reproduces it
    d, _ = run(worker, prompt="Seeded", max_tokens=20, temperature=1.0)
    e, _ = run(worker, prompt="Seeded", max_tokens=20, temperature=1.0, seed=d.seed)
    assert d.tokens == e.tokens


@pytest.mark.parametrize("n", [0, 1, 7])
def test_max_tokens(worker, n):
    result, _ = run(worker, prompt="Count", max_tokens=n, temperature=0, ignore_eos=True)
    assert len(result.tokens) == n
    assert result.stop_reason == "max_tokens"


def test_chat_messages_use_the_template(worker):
    rendered = worker.tokenize(model_id="tiny", messages=CHAT)
    assert rendered.prompt.startswith("<|im_start|>user\nTell me about the sea.<|im_end|>")
    assert rendered.prompt.endswith("<|im_start|>assistant\n")
    no_gen = worker.tokenize(model_id="tiny", messages=CHAT, add_generation_prompt=False)
    assert rendered.tokens[: no_gen.count] == no_gen.tokens and rendered.count > no_gen.count
    via_messages, _ = run(worker, messages=CHAT, max_tokens=20, temperature=0)
    via_tokens, _ = run(worker, tokens=rendered.tokens, max_tokens=20, temperature=0)
    assert via_messages.tokens == via_tokens.tokens
    assert via_messages.usage.prompt_tokens == rendered.count


def test_stop_string_spanning_tokens(worker):
    # The weights are random: take a stop string from a first run's output,
    # choosing one that spans a token boundary.
    first, events = run(worker, prompt="Stop here please", max_tokens=40, temperature=0, ignore_eos=True)
    pieces = [e.text for e in events if isinstance(e, protocol.TokenEvent)]
    k = next(i for i in range(5, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    before = "".join(pieces[:k])
    stop = pieces[k][-1:] + pieces[k + 1][:2]
    assert len(stop) >= 2
    cut_at = (before + pieces[k] + pieces[k + 1]).find(stop)
    second, events2 = run(worker, prompt="Stop here please", max_tokens=40, temperature=0,
                          ignore_eos=True, stop=["never-appears-xyz", stop])
    assert second.stop_reason == "stop_string"
    assert second.stop_string == stop
    assert second.text == first.text[:cut_at]
    assert stop not in second.text
    assert text_of(events2) == second.text  # the held-back partial never leaked
    # tokens run up to and including the one that completed the stop string
    assert second.tokens == first.tokens[: len(second.tokens)]
    completed = worker.detokenize(second.tokens, model_id="tiny")
    assert stop in completed and stop not in worker.detokenize(second.tokens[:-1], model_id="tiny")


def test_stop_token_ids(worker):
    first, _ = run(worker, prompt="Stop token", max_tokens=20, temperature=0, ignore_eos=True)
    target = first.tokens[5]
    second, _ = run(worker, prompt="Stop token", max_tokens=20, temperature=0, stop_token_ids=[target])
    assert second.stop_reason == "eos" and second.stop_token == target
    assert second.tokens == first.tokens[: first.tokens.index(target)]


def test_eos_stops_and_is_not_returned(worker):
    # Bias the model hard towards <|im_end|> after a few tokens: greedy picks it.
    eos = worker.status().models[0]
    load = worker.load(eos.path, model_id="tiny")
    im_end = load.eos_token_ids[-1]
    result, events = run(worker, prompt="Short answer", max_tokens=20, temperature=0,
                         logit_bias={str(im_end): 100.0})
    assert result.stop_reason == "eos"
    assert result.tokens == [] and result.text == ""
    assert result.stop_token in load.eos_token_ids


def test_top_logprobs(worker):
    result, events = run(worker, prompt="Logprobs", max_tokens=8, temperature=0, top_logprobs=5)
    entries = logprob_entries(events)
    assert [lp.token for lp in entries] == result.tokens
    for lp in entries:
        assert len(lp.top) == 5
        values = [t.logprob for t in lp.top]
        assert values == sorted(values, reverse=True)
        assert lp.top[0].token == lp.token  # greedy picks the most likely
        assert math.isclose(lp.top[0].logprob, lp.logprob, rel_tol=1e-6)
        assert all(v <= 0 for v in values)
    plain, events = run(worker, prompt="Logprobs", max_tokens=8, temperature=0, logprobs=True)
    entries = logprob_entries(events)
    assert entries and all(lp.top is msgspec.UNSET for lp in entries)  # logprobs alone: no alternatives
    assert plain.tokens == result.tokens


def test_logit_bias_and_penalties_change_output(worker):
    base, _ = run(worker, prompt="Bias", max_tokens=10, temperature=0, ignore_eos=True)
    biased, _ = run(worker, prompt="Bias", max_tokens=10, temperature=0, ignore_eos=True,
                    logit_bias={"300": 50.0})
    assert biased.tokens == [300] * 10
    penalized, _ = run(worker, prompt="Bias", max_tokens=10, temperature=0, ignore_eos=True,
                       logit_bias={"300": 5.0}, frequency_penalty=3.0)
    assert penalized.tokens.count(300) < 10
    assert base.tokens != biased.tokens


def continuation(worker, prompt_ids, tokens):
    """decode(prompt + tokens) - decode(prompt): the text the host should append."""
    whole = worker.detokenize(prompt_ids + tokens, model_id="tiny")
    head = worker.detokenize(prompt_ids, model_id="tiny")
    assert whole.startswith(head)
    return whole[len(head):]


def test_utf8_never_split_across_events(worker):
    # Sampling at high temperature from a random model emits partial byte
    # tokens. An event carrying half a character would put U+FFFD where the
    # detokenized continuation has the whole character.
    # The regex runs make sure characters really are split across tokens (the
    # fixture vocabulary spells these byte by byte).
    prompt_ids = worker.tokenize(model_id="tiny", text="Ünïcödé 中文 🙂").tokens
    held = 0
    runs = [{"ignore_eos": True}] * 4 + [{"constraint": {"type": "regex", "pattern": "[中文🙂é]{8}"}}] * 2
    for seed, extra in enumerate(runs):
        result, events = run(worker, tokens=prompt_ids, max_tokens=60, temperature=1.5, seed=seed, **extra)
        expected = continuation(worker, prompt_ids, result.tokens)
        assert result.text == expected
        so_far = ""
        for e in events:
            if isinstance(e, protocol.TokenEvent):
                so_far += e.text
                assert expected.startswith(so_far), (so_far, expected)
                held += bool(e.tokens) and not e.text
        assert so_far == expected
    assert held, "no token was held back: the case was not exercised"


def test_context_limit(worker, tiny_model):
    w = worker
    status = w.status().models[0]
    ctx = status.context_length
    with pytest.raises(Exception) as err:
        run(w, tokens=[5] * (ctx + 1), max_tokens=1)
    assert getattr(err.value, "code", None) == -32004
    result, _ = run(w, tokens=[5] * (ctx - 3), max_tokens=50, temperature=0, ignore_eos=True)
    assert result.stop_reason == "max_tokens" and len(result.tokens) == 3


def test_bytes_that_can_never_complete_are_not_held_to_the_end(worker):
    # A token that is one invalid byte on its own, repeated: each is U+FFFD
    # at once. The stream must not hold them all back until the end.
    vocab = worker.status().models[0].vocab_size
    lone = next(t for t in range(3, vocab)
                if worker.detokenize([t], model_id="tiny") == "\ufffd"
                and worker.detokenize([t] * 4, model_id="tiny") == "\ufffd" * 4)
    result, events = run(worker, prompt="bytes", max_tokens=12, temperature=0, ignore_eos=True,
                         logit_bias={str(lone): 100.0})
    assert result.tokens == [lone] * 12
    assert result.text == "\ufffd" * 12
    token_events = [e for e in events if isinstance(e, protocol.TokenEvent)]
    released_early = [e for e in token_events[:8] if e.text]
    assert released_early, "invalid bytes were held until the end of the generation"
    assert text_of(events) == result.text

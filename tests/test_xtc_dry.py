"""XTC and DRY through a real worker on tiny-llama: each changes what
llama.cpp's definition says it changes and nothing else, seeded and the
same in a batch as alone.

DRY's effect is read from the logprobs the worker reports (they are after
penalties): relative to a plain run, every token's logprob moves by the same
normalisation constant except the one that would extend a repeat, which
moves by exactly ``-multiplier * base ** (length - allowed_length)`` more.
"""

from __future__ import annotations

import math

import pytest

from conftest import logprob_entries, spawn
from mlx_worker import protocol
from mlx_worker.client import RpcError

BREAKER_CHARS = ("\n", ":", '"', "*")


@pytest.fixture(scope="module")
def xw(tiny_model):
    w = spawn()
    w.load(tiny_model, model_id="tiny")
    yield w
    w.close()


def plain_ids(w, n: int) -> list[int]:
    """``n`` token ids whose text holds no default sequence breaker."""
    ids = []
    for t in range(260, 400):
        text = w.detokenize([t], model_id="tiny")
        if text.strip() and not any(c in text for c in BREAKER_CHARS):
            ids.append(t)
        if len(ids) == n:
            return ids
    raise AssertionError("not enough plain tokens")


def first_logprobs(w, tokens: list[int], bias: dict, **extra) -> dict[int, float]:
    """token -> logprob of the first generated position (top 20)."""
    stream = w.generate(model_id="tiny", tokens=tokens, max_tokens=1, temperature=0, top_logprobs=20,
                        logit_bias=bias, ignore_eos=True, **extra)
    events = list(stream)
    lps = logprob_entries(events)
    assert len(lps) == 1
    return {t.token: t.logprob for t in lps[0].top}


def shifts(plain: dict, other: dict) -> dict[int, float]:
    return {t: other[t] - plain[t] for t in plain if t in other}


@pytest.mark.parametrize("repeat,mult,base", [(3, 0.8, 1.75), (4, 0.5, 2.0)])
def test_dry_penalises_exactly_the_token_that_extends_a_repeat(xw, repeat, mult, base):
    ids = plain_ids(xw, repeat + 3)
    seq, nxt, filler = ids[:repeat], ids[repeat], ids[repeat + 1 : repeat + 3]
    # [seq nxt filler seq]: the context ends with `seq`, which was followed by `nxt` before.
    tokens = seq + [nxt] + filler + seq
    # Every candidate of interest pushed into the top 20, well apart.
    bias = {str(t): 12.0 - 0.5 * k for k, t in enumerate(ids)}
    plain = first_logprobs(xw, tokens, bias)
    dry = first_logprobs(xw, tokens, bias, dry_multiplier=mult, dry_base=base, dry_allowed_length=2)
    moved = shifts(plain, dry)
    assert nxt in moved and len(moved) >= 10
    others = [v for t, v in moved.items() if t != nxt]
    norm = others[0]
    assert all(abs(v - norm) < 1e-4 for v in others), moved  # nothing else changed
    expected = mult * base ** (repeat - 2)
    assert math.isclose(norm - moved[nxt], expected, rel_tol=1e-3, abs_tol=1e-4), (moved[nxt], norm, expected)


def test_dry_multiplier_zero_and_short_repeats_change_nothing(xw):
    ids = plain_ids(xw, 6)
    tokens = ids[:3] + [ids[3]] + ids[4:6] + ids[:3]
    bias = {str(t): 12.0 - 0.5 * k for k, t in enumerate(ids)}
    plain = first_logprobs(xw, tokens, bias)
    assert first_logprobs(xw, tokens, bias, dry_multiplier=0.0) == plain
    # A repeat of 3 tokens is within an allowed length of 4: no penalty.
    moved = shifts(plain, first_logprobs(xw, tokens, bias, dry_multiplier=0.8, dry_allowed_length=4))
    assert all(abs(v) < 1e-5 for v in moved.values())
    # The same repeat ending in a sequence breaker: no penalty either.
    breaker = xw.detokenize([ids[2]], model_id="tiny")
    moved = shifts(plain, first_logprobs(xw, tokens, bias, dry_multiplier=0.8, dry_sequence_breakers=[breaker]))
    assert all(abs(v) < 1e-5 for v in moved.values())


def test_dry_greedy_stops_a_loop(xw):
    """A token forced by logit_bias repeats forever plainly; DRY (over the
    generated tokens, which it sees as context) breaks the loop."""
    ids = plain_ids(xw, 2)
    common = dict(model_id="tiny", tokens=ids, max_tokens=12, temperature=0, ignore_eos=True,
                  logit_bias={str(ids[0]): 6.0})
    plain = xw.generate(**common).wait()
    dry = xw.generate(**common, dry_multiplier=2.0, dry_base=2.0, dry_allowed_length=2).wait()
    assert plain.tokens.count(ids[0]) == 12
    assert dry.tokens.count(ids[0]) < 12
    assert dry.tokens[:3] == plain.tokens[:3]  # no repeat of 2 yet: nothing to penalise


def sample_first(w, bias: dict, seed: int, **extra) -> protocol.GenerateResult:
    ids = plain_ids(w, 2)
    return w.generate(model_id="tiny", tokens=ids, max_tokens=1, temperature=1.0, seed=seed,
                      logit_bias=bias, **extra).wait()


def test_xtc_removes_top_choices_but_the_least_likely(xw):
    x, y = plain_ids(xw, 5)[3:5]
    bias = {str(x): 30.0, str(y): 30.0}  # two likely tokens, the rest ~0
    top = first_logprobs(xw, plain_ids(xw, 2), bias)
    a, b = sorted((x, y), key=lambda t: -top[t])  # a the more likely
    assert 0.1 < math.exp(top[b]) < 0.5
    seeds = range(16)
    plain = [sample_first(xw, bias, s).tokens[0] for s in seeds]
    xtc = [sample_first(xw, bias, s, xtc_probability=1.0, xtc_threshold=0.1).tokens[0] for s in seeds]
    assert a in plain and b in plain
    assert set(xtc) == {b}  # a removed; b, the least likely above the threshold, kept
    # Only a reaches a threshold of 0.5: nothing is removed.
    high = [sample_first(xw, bias, s, xtc_probability=1.0, xtc_threshold=0.5).tokens[0] for s in seeds]
    assert a in high
    # Probability 0 is plain sampling, token for token.
    assert [sample_first(xw, bias, s, xtc_probability=0.0).tokens[0] for s in seeds] == plain
    # Half the tokens (by the request's own coin): both outcomes, and seeded.
    half = [sample_first(xw, bias, s, xtc_probability=0.5).tokens[0] for s in seeds]
    assert a in half and b in half
    assert [sample_first(xw, bias, s, xtc_probability=0.5).tokens[0] for s in seeds] == half


def test_xtc_never_removes_eos(xw):
    eos = xw.load(xw.status().models[0].path, model_id="tiny").eos_token_ids[0]
    b = plain_ids(xw, 1)[0]
    bias = {str(eos): 30.0, str(b): 29.5}
    ends = [sample_first(xw, bias, s, xtc_probability=1.0, xtc_threshold=0.1).stop_reason for s in range(16)]
    assert "eos" in ends  # EOS, the most likely, is protected from XTC


def test_xtc_and_dry_are_the_same_in_a_batch_as_alone(xw):
    import threading

    ids = plain_ids(xw, 8)
    base = dict(model_id="tiny", max_tokens=20, ignore_eos=True)
    params = [
        {**base, "tokens": ids[:4] * 2, "temperature": 1.0, "seed": 5, "xtc_probability": 0.7, "xtc_threshold": 0.05},
        {**base, "tokens": ids[2:6] * 3, "temperature": 0, "dry_multiplier": 1.0},
        {**base, "tokens": ids[1:5] * 2, "temperature": 0.9, "seed": 6, "dry_multiplier": 0.8,
         "xtc_probability": 0.5, "xtc_threshold": 0.02},
        {**base, "tokens": ids[3:8], "temperature": 1.0, "seed": 7},
    ]
    alone = [xw.generate(**p).wait() for p in params]
    streams = [xw.generate(**p) for p in params]
    waiters = [threading.Thread(target=s.wait) for s in streams]
    for t in waiters:
        t.start()
    running = []
    while any(t.is_alive() for t in waiters):
        running.append(len(xw.status().queue.running))
    for t in waiters:
        t.join()
    assert max(running) >= 2
    for a, s in zip(alone, streams):
        assert s.result.tokens == a.tokens


@pytest.mark.parametrize("field,value", [
    ("xtc_probability", 1.5), ("xtc_threshold", 0.6), ("dry_multiplier", -1.0), ("dry_base", 0.5),
    ("dry_allowed_length", 0), ("dry_penalty_last_n", -2), ("dry_sequence_breakers", [""]),
])
def test_out_of_range_values_are_refused_naming_the_field(xw, field, value):
    with pytest.raises(RpcError) as info:
        xw.generate(model_id="tiny", prompt="x", max_tokens=1, **{field: value}).wait()
    assert info.value.code == -32602 and field in str(info.value)

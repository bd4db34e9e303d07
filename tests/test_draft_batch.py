"""Speculative requests of one (target, draft) pair decode in one group
(engine/draft_batch.py), through a real worker.

Each request sent together with others gives exactly what it gives alone
with the same draft (tokens; logprobs within float32 rounding); the worker's
info log names the rows of each speculative batch as they join, which shows
they shared rounds. Pair: spec-target / spec-draft (see test_speculative.py).
"""

from __future__ import annotations

import re
import tempfile

import pytest

from conftest import cancel_after, logprob_entries, spawn
from fixtures.build import ensure_model
from mlx_worker import protocol

PROMPTS = [
    "the model token server request response error value",
    "water sun tree",
    "a long walk to the river and back again before the sun goes down over the hills",
    "one",
]
LOGPROB_TOL = 1e-4  # float32: a batch rounds a little differently (spec: "Numerics per dtype")


@pytest.fixture(scope="module")
def w():
    log = tempfile.TemporaryFile()
    worker = spawn("--log-level", "info", stderr=log)
    worker.load(str(ensure_model("spec-draft")), model_id="draft")
    worker.load(str(ensure_model("spec-target")), model_id="target")
    worker.log = log
    yield worker
    worker.close()
    log.close()


def batches(w) -> list[set[str]]:
    """The rows of each speculative batch the worker's log reported, as rows joined."""
    w.log.seek(0)
    text = w.log.read().decode("utf-8", "replace")
    w.log.seek(0)
    w.log.truncate()
    return [set(re.findall(r"[\w-]+", m)) for m in re.findall(r"speculative batch: \d+ rows \[(.*)\]", text)]


def ids(streams) -> set[str]:
    return {str(s.id) for s in streams}


def params(i: int, **extra) -> dict:
    p = dict(model_id="target", prompt=PROMPTS[i % len(PROMPTS)], draft_model_id="draft", num_draft_tokens=3,
             max_tokens=[40, 28, 48, 36][i % 4], ignore_eos=True, prompt_cache=False, logprobs=True, temperature=0)
    p.update(extra)
    return p


def logprobs(events) -> list[float]:
    return [lp.logprob for lp in logprob_entries(events)]


def together(w, requests: list[dict]) -> tuple[list, set[str]]:
    streams = [w.generate(**p) for p in requests]
    return [(s.wait(), s.events) for s in streams], ids(streams)


def alone(w, requests: list[dict]) -> list:
    out = []
    for p in requests:
        s = w.generate(**p)
        out.append((s.wait(), s.events))
    return out


def assert_equal_runs(solo, batched) -> None:
    for (a, a_events), (b, b_events) in zip(solo, batched):
        assert b.tokens == a.tokens
        assert (b.text, b.stop_reason) == (a.text, a.stop_reason)
        la, lb = logprobs(a_events), logprobs(b_events)
        assert len(la) == len(lb) == len(a.tokens)
        assert max(abs(x - y) for x, y in zip(la, lb)) < LOGPROB_TOL


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_p": 0.95}], ids=["greedy", "seeded"])
def test_four_requests_share_rounds_and_each_equals_its_solo_run(w, sampling):
    requests = [params(i, **sampling, **({"seed": 11 + i} if sampling else {})) for i in range(4)]
    solo = alone(w, requests)
    batches(w)  # the solo runs' lines: none has a second row
    batched, sent = together(w, requests)
    assert_equal_runs(solo, batched)
    seen = batches(w)
    assert sent in seen, seen  # all four in one batch at once
    for result, _ in batched:
        u = result.usage
        assert u.draft_tokens > 0 and 0 < u.accepted_draft_tokens <= u.draft_tokens
        assert sum(k * n for k, n in enumerate(u.draft_rounds)) == u.draft_tokens


def test_a_cancelled_row_leaves_the_others_undisturbed(w):
    requests = [params(i, max_tokens=60) for i in range(3)]
    solo = alone(w, requests)
    batches(w)
    streams = [w.generate(**p) for p in requests]
    cancelled = cancel_after(streams[1], 6)
    rest = [(s.wait(), s.events) for s in (streams[0], streams[2])]
    assert cancelled.stop_reason == "cancelled"
    assert 6 <= len(cancelled.tokens) < 60
    assert cancelled.tokens == solo[1][0].tokens[: len(cancelled.tokens)]
    assert_equal_runs([solo[0], solo[2]], rest)
    seen = batches(w)
    assert ids(streams) in seen, seen


def test_a_draft_batch_beside_plain_requests_never_stops_them(w):
    """Plain requests of the same target decode in their own batch while
    the speculative ones run: a short plain one ends while the long
    speculative ones are still going, with its solo output."""
    plain = dict(model_id="target", prompt=PROMPTS[1], max_tokens=6, ignore_eos=True, prompt_cache=False,
                 temperature=0)
    plain_solo = w.generate(**plain).wait()
    batches(w)
    spec = [w.generate(**params(i, max_tokens=400)) for i in range(2)]
    for _ in zip(range(3), spec[0]):  # both speculative requests under way
        pass
    short = w.generate(**plain).wait()
    assert short.tokens == plain_solo.tokens
    for s in spec:
        s.cancel()
        assert s.wait().stop_reason == "cancelled"
        assert len(s.result.tokens) < 400
    seen = batches(w)
    assert ids(spec) in seen, seen


def test_rows_with_their_own_processors_and_the_prompt_cache(w):
    """Penalties, logit_bias and a constraint are each row's own; rows that end in a batch
    leave both models' caches cut to what they emitted, so the next turn
    continues them (cached_tokens) and equals a cold run."""
    extra = [{"repetition_penalty": 1.3}, {"logit_bias": {"5": 4.0, "9": -50.0}}, {"presence_penalty": 0.8},
             {"constraint": {"type": "regex", "pattern": "[a-z ]{5,40}"}, "ignore_eos": False}]
    requests = [params(i, prompt_cache=True, **extra[i]) for i in range(4)]
    solo = alone(w, [dict(r, prompt_cache=False) for r in requests])
    batches(w)
    batched, sent = together(w, requests)
    assert_equal_runs(solo, batched)
    assert sent in batches(w)
    for i, (first, _) in enumerate(batched[:2]):
        follow = dict(requests[i], prompt=requests[i]["prompt"] + first.text + " more", max_tokens=12)
        warm, cold = w.generate(**follow).wait(), w.generate(**dict(follow, prompt_cache=False)).wait()
        assert warm.usage.cached_tokens > 0
        assert warm.tokens == cold.tokens


@pytest.mark.heavy
def test_a_lone_request_that_paused_its_draft_joins_a_batch(w):
    """On a pair that rarely agrees the lone request soon decodes without
    its draft (plain steps, the draft lagging); a second request of the pair
    then makes a batch of both: the lagging draft catches up and both equal
    their solo runs, greedy and seeded. Two sent together pause their
    drafts in the batch too (plain rounds), and a third joining them drafts."""
    w.load(str(ensure_model("spec-target-far")), model_id="far")
    try:
        for sampling in ({}, {"temperature": 1.0, "seed": 5}):
            first = params(0, model_id="far", max_tokens=120, num_draft_tokens=4, **sampling)
            second = params(1, model_id="far", max_tokens=30, num_draft_tokens=4, **sampling)
            solo = alone(w, [first, second])
            assert solo[0][0].usage.draft_rounds[0] > 0  # it did pause its draft
            batches(w)
            a = w.generate(**first)
            for _ in zip(range(40), (e for e in a if isinstance(e, protocol.TokenEvent))):
                pass  # well past its first pause
            b = w.generate(**second)
            assert_equal_runs(solo, [(a.wait(), a.events), (b.wait(), b.events)])
            assert ids([a, b]) in batches(w)
        # Two sent together pause their drafts in the batch (plain rounds);
        # a third that joins drafts at once: the draft first reads what the
        # two skipped (rows of different lengths in one pass).
        requests = [params(i, model_id="far", max_tokens=[120, 100, 40][i], num_draft_tokens=4) for i in range(3)]
        solo = alone(w, requests)
        batches(w)
        a, b = w.generate(**requests[0]), w.generate(**requests[1])
        for _ in zip(range(40), (e for e in a if isinstance(e, protocol.TokenEvent))):
            pass
        c = w.generate(**requests[2])
        batched = [(s.wait(), s.events) for s in (a, b, c)]
        assert_equal_runs(solo, batched)
        assert ids([a, b, c]) in batches(w)
        for result, _ in batched[:2]:
            assert result.usage.draft_rounds[0] >= 30, result.usage
    finally:
        w.unload("far")

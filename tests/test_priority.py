"""`generate {priority}` through a real worker: interactive prompts are
prefilled ahead of a background one (which yields between its chunks),
`status` lists each request's state and priority, a bad priority is refused
naming the field, and a priority never changes a request's tokens.

Order is read from the event lines (never wall time).
"""

from __future__ import annotations

import json

import msgspec
import pytest

from conftest import spawn
from mlx_worker import protocol

LONG = [7, 8, 9, 10] * 900  # 3,600 tokens (the context is 4,096): many chunks at prefill_step_size 64
STEP = 64


def lines(w) -> list[dict]:
    return [json.loads(line) for line in w.lines]


def progress(msgs: list[dict], rid) -> list[tuple[int, dict]]:
    return [(i, m["params"]) for i, m in enumerate(msgs)
            if m.get("method") == "progress" and m["params"]["id"] == rid]


def first_token(msgs: list[dict], rid) -> int:
    return next(i for i, m in enumerate(msgs) if m.get("method") == "token" and m["params"]["id"] == rid)


def test_a_bad_priority_is_refused_naming_the_field(worker):
    for bad in ("urgent", 1, None):
        with pytest.raises(Exception) as err:
            worker.generate(model_id="tiny", prompt="sea", max_tokens=2, priority=bad).wait()
        assert err.value.code == -32602 and err.value.data["field"] == "params.priority", (bad, err.value.data)
    assert worker.generate(model_id="tiny", prompt="sea", max_tokens=2, priority="background").wait().tokens


def test_an_interactive_prompt_is_prefilled_ahead_of_a_background_one(worker):
    """A 3,600-token background prompt is prefilling when an interactive
    600-token prompt arrives: every chunk of the interactive one runs next
    (no background chunk between its first and its last), its first token
    comes before the background prefill is done, `status` shows both, and
    each request's tokens equal its solo run."""
    base = {"model_id": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "prompt_cache": False,
            "prefill_step_size": STEP}
    bg_params = {**base, "tokens": LONG, "priority": "background"}
    ia_params = {**base, "tokens": [11, 12, 13, 14, 15] * 120}
    start = len(worker.lines)
    bg = worker.generate(**bg_params)
    next(e for e in bg if isinstance(e, protocol.ProgressEvent))  # its prefill has begun
    ia = worker.generate(**ia_params)
    seen = {}
    while ia.result is None and len(seen) < 2:  # status while both are held
        for r in worker.status().requests:
            if r.id in (bg.id, ia.id):
                seen.setdefault(r.id, (r.state, r.priority))
    ra, rb = ia.wait(), bg.wait()
    assert seen[bg.id] == ("prefilling", "background"), seen
    assert seen[ia.id][1] == "interactive" and seen[ia.id][0] in (
        "queued", "preparing", "prefilling", "decoding"), seen
    msgs = lines(worker)[start:]
    bg_prog, ia_prog = progress(msgs, bg.id), progress(msgs, ia.id)
    bg_prefilled = next(i for i, p in bg_prog if p["processed"] == p["total"])
    assert first_token(msgs, ia.id) < bg_prefilled, "the interactive request waited for the background prefill"
    ia_first, ia_last = ia_prog[0][0], next(i for i, p in ia_prog if p["processed"] == p["total"])
    assert len(ia_prog) > 3, "the interactive prompt took too few chunks to show an order"
    between = [p for i, p in bg_prog if ia_first < i < ia_last]
    assert not between, f"background chunks ran between the interactive prompt's chunks: {between}"
    assert worker.generate(**ia_params).wait().tokens == ra.tokens
    assert worker.generate(**{**bg_params, "priority": "interactive"}).wait().tokens == rb.tokens


def test_status_lists_no_request_when_idle_and_default_is_interactive(worker):
    assert worker.status().requests == []
    s = worker.generate(model_id="tiny", prompt="sea ship", max_tokens=200, ignore_eos=True)
    next(e for e in s if isinstance(e, protocol.TokenEvent))  # decoding
    rows = [r for r in worker.status().requests if r.id == s.id]
    assert [(r.state, r.priority, r.paused) for r in rows] == [("decoding", "interactive", False)]
    assert s.cancel() is True and s.wait().stop_reason == "cancelled"
    assert worker.status().requests == []


def test_status_requests_agree_with_its_queue(worker):
    """`status` sent right behind four generates, as a polling host would:
    its requests' states and its queue come from one view. A request the
    scheduler holds is in queue.running (or waiting), and every pending one
    reads "queued" (before, 6 of 18 such replies disagreed: pending 4, all
    four "prefilling", running empty)."""
    prompt = [9 + j % 500 for j in range(600)]
    for trial in range(6):
        gens = [worker.start("generate", {"model_id": "tiny", "tokens": [k + 5] + prompt, "max_tokens": 4,
                                          "ignore_eos": True, "prompt_cache": False}) for k in range(4)]
        replies = [worker.start("status") for _ in range(3)]
        for _, inbox in replies:
            st = msgspec.convert(inbox.get(timeout=60)["result"], protocol.StatusResult)
            queued = [r.id for r in st.requests if r.state == "queued"]
            held = [r.id for r in st.requests if r.state != "queued"]
            # every pending one is queued; a taken one reads "queued" until the scheduler holds it
            assert st.queue.pending <= len(queued), (trial, st.queue, st.requests)
            assert all(rid in st.queue.running + st.queue.waiting for rid in held), (trial, st.queue, st.requests)
        for _, inbox in gens:
            while "method" in inbox.get(timeout=120):
                pass


def test_an_interactive_request_waiting_for_memory_goes_before_a_background_one(tiny_model):
    """Memory for one request at a time: a background request that came
    first waits behind an interactive one that came later (the interactive
    one waits for the running request rather than being refused); both
    produce their solo tokens."""
    from test_batching import line_index, prompt, room_for_one_and_a_half

    w = spawn()
    try:
        req = {"max_tokens": 500, "temperature": 0, "ignore_eos": True, "prompt": prompt(2)}
        w.load(tiny_model, model_id="tiny", memory_limit=room_for_one_and_a_half(w, tiny_model, req))
        req["model_id"] = "tiny"
        a = w.generate(**req)
        next(e for e in a if isinstance(e, protocol.TokenEvent))  # running
        b = w.generate(**{**req, "priority": "background"})  # waits for a's memory
        while not any(r.id == b.id and r.state == "waiting_memory" for r in w.status().requests):
            pass
        c = w.generate(**req)  # interactive: waits too, ahead of b
        while not any(r.id == c.id and r.state == "waiting_memory" for r in w.status().requests):
            pass
        ra, rb, rc = a.wait(), b.wait(), c.wait()
        first = lambda s: line_index(w, lambda m: m.get("method") == "token" and m["params"]["id"] == s.id)  # noqa: E731
        c_end = line_index(w, lambda m: m.get("id") == c.id and "result" in m)
        assert first(c) < first(b), "the background request was admitted before the interactive one"
        assert first(b) > c_end, "the background request did not wait for the interactive one's memory"
        assert ra.tokens == rb.tokens == rc.tokens and len(ra.tokens) == 500
    finally:
        w.close()


def test_preemption_pauses_a_background_request_before_a_younger_interactive_one(tiny_model, tmp_path):
    """Two decoding requests outgrow a lowered limit: the older one, being
    background, is paused (status says so), the interactive one goes on;
    both end with the tokens of an uninterrupted run."""
    from test_preemption import tokens

    w = spawn("--cache-dir", str(tmp_path / "kv"))
    try:
        w.load(tiny_model, model_id="m", prompt_cache_entries=0)
        params = [dict(model_id="m", tokens=tokens(300, s), max_tokens=400, ignore_eos=True, temperature=0,
                       priority=p) for s, p in ((1, "background"), (2, "interactive"))]
        alone = [w.generate(**p).wait().tokens for p in params]
        bg, ia = [w.generate(**p) for p in params]
        for stream, n in ((ia, 5), (bg, 1)):  # both decode (the background one may still be prefilling)
            seen = 0
            for event in stream:
                if isinstance(event, protocol.TokenEvent):
                    seen += 1
                    if seen == n:
                        break
        w.set_limits(memory_limit=w.status().memory.active)  # under their KV
        paused = []
        for _ in range(1000):
            paused = [r for r in w.status().requests if r.paused]
            if paused:
                break
        assert [(r.id, r.priority, r.state) for r in paused] == [(bg.id, "background", "decoding")]
        ra = ia.wait()
        rb = bg.wait()
        assert [rb.tokens, ra.tokens] == alone
    finally:
        w.close()

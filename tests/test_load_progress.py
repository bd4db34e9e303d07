"""`load` streams load_progress events and can be cancelled between groups
of weights, through a real worker (protocol/README.md, "Load progress")."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import spawn
from fixtures.build import ensure_model

PHASES = ["checks", "tokenizer", "weights"]


def load_messages(w, params, on_event=None, timeout=120.0):
    """Send a load; every message for it (events, then the response)."""
    rid, inbox = w.start("load", params)
    messages = []
    try:
        while True:
            msg = w._take(inbox, timeout)
            messages.append(msg)
            if "method" not in msg:
                return rid, messages
            if on_event is not None:
                on_event(rid, msg["params"])
    finally:
        w._finish(rid)


def check_progress(events):
    """Phases in order; within a phase done never decreases and ends at total."""
    phases = []
    for e in events:
        if not phases or phases[-1][0] != e["phase"]:
            phases.append((e["phase"], []))
        phases[-1][1].append(e)
    names = [p for p, _ in phases]
    assert len(set(names)) == len(names), names  # each phase once, in one run
    for _, evs in phases:
        done = [e["done"] for e in evs]
        assert done == sorted(done) and len({e["total"] for e in evs}) == 1
    return names, {p: evs for p, evs in phases}


def test_progress_is_monotone_and_ends_at_total_before_the_result(fresh_worker, small_model):
    rid, messages = load_messages(fresh_worker, {"model": small_model, "model_id": "s"})
    *events, response = messages
    assert "result" in response and all(m["method"] == "load_progress" for m in events)
    events = [m["params"] for m in events]
    assert all(e["id"] == rid for e in events)
    names, by_phase = check_progress(events)
    assert names == PHASES
    for evs in by_phase.values():
        assert evs[0]["done"] == 0 and evs[-1]["done"] == evs[-1]["total"]
    weights = by_phase["weights"]
    # Real bytes, layer by layer: the embeddings/head group, then one per layer.
    assert len(weights) == 1 + 1 + 8  # the 0 event, the rest, 8 layers
    files = sum(p.stat().st_size for p in Path(small_model).glob("*.safetensors"))
    assert abs(weights[-1]["total"] - files) / files < 0.01
    assert abs(response["result"]["memory_bytes"] - files) / files < 0.05


def test_vision_model_reports_its_tower(fresh_worker):
    path = str(ensure_model("tiny-qwen2-vl"))
    _, messages = load_messages(fresh_worker, {"model": path})
    names, by_phase = check_progress([m["params"] for m in messages[:-1]])
    assert names == ["checks", "tokenizer", "vision_tower", "weights"] and "result" in messages[-1]
    for evs in by_phase.values():
        assert evs[-1]["done"] == evs[-1]["total"] > 0


def test_an_already_loaded_model_reports_its_checks(fresh_worker, tiny_model):
    fresh_worker.load(tiny_model, model_id="t")
    _, messages = load_messages(fresh_worker, {"model": tiny_model, "model_id": "t"})
    assert [m["params"]["phase"] for m in messages[:-1]] == ["checks", "checks"]
    assert messages[-1]["result"]["already_loaded"] is True


def cancelled_load(w, path, phase, tries=5):
    """Cancel a load at its first event of `phase` (with bytes done, for
    weights); retried when the load finished before the cancel arrived."""
    for _ in range(tries):
        sent = {}

        def on_event(rid, e):
            if e["phase"] == phase and (phase != "weights" or e["done"] > 0) and not sent:
                sent["cancelled"] = w.cancel(rid)

        _, messages = load_messages(w, {"model": path, "model_id": "s"}, on_event)
        if sent.get("cancelled"):
            return messages
        assert "result" in messages[-1]
        w.unload("s")
    pytest.fail("the load always finished before the cancel")


@pytest.mark.parametrize("phase", ["tokenizer", "weights"])
def test_cancel_mid_load_leaves_nothing_and_the_load_then_works(fresh_worker, small_model, phase):
    w = fresh_worker
    prompt = dict(prompt="The sea and the city", max_tokens=12, temperature=0, ignore_eos=True)
    w.load(small_model, model_id="s")
    expected = w.generate(model_id="s", **prompt).wait().tokens
    w.unload("s")
    baseline = w.call("status", {})["memory"]["active"]

    messages = cancelled_load(w, small_model, phase)
    response = messages[-1]
    assert response["error"]["code"] == -32012, response
    weights = [m["params"] for m in messages[:-1] if m["params"]["phase"] == "weights"]
    if phase == "weights":  # stopped between groups: not every byte was read
        assert 0 < weights[-1]["done"] < weights[-1]["total"]
    else:
        assert [e["done"] for e in weights] in ([], [0])
    status = w.call("status", {})
    assert status["models"] == []
    assert abs(status["memory"]["active"] - baseline) < 64 * 1024  # the weights are ~80 MB

    w.load(small_model, model_id="s")
    assert w.generate(model_id="s", **prompt).wait().tokens == expected


def test_cancel_of_a_queued_load(fresh_worker, small_model, tiny_model):
    """A load cancelled while queued behind another answers -32012 at once."""
    w = fresh_worker
    first, _ = w.start("load", {"model": small_model, "model_id": "s"})
    second, inbox = w.start("load", {"model": tiny_model, "model_id": "t"})
    assert w.cancel(second) is True
    msg = w._take(inbox, 30)
    while "method" in msg:
        msg = w._take(inbox, 30)
    assert msg["error"]["code"] == -32012
    models = {m["model_id"] for m in w.call("status", {})["models"]}
    assert "t" not in models


def test_cancel_of_a_finished_load_is_false(fresh_worker, tiny_model):
    rid, messages = load_messages(fresh_worker, {"model": tiny_model, "model_id": "t"})
    assert "result" in messages[-1]
    assert fresh_worker.cancel(rid) is False

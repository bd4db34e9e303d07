"""Eight different requests at once on one worker — 2 image chats (a vision
model), 2 with a draft model, 2 constrained, 2 plain (a text model) — each
equals its solo run: tokens, stop reason, and logprobs within the spec's
float32 bound. (bench/mixed_eight.py times the same eight against running
them one after another.)
"""

from __future__ import annotations

import json
import threading

import pytest

from conftest import logprob_entries, spawn
from fixtures.build import ensure_model
from vision_images import b64, gradient, noise, png, user

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["name", "n"],
          "additionalProperties": False}


def eight() -> list[dict]:
    text = {"model_id": "target", "prompt_cache": False}
    vision = {"model_id": "vl", "prompt_cache": False, "max_tokens": 24, "temperature": 0, "logprobs": True}
    return [
        {**vision, "messages": user("What is in the picture?", ("image", b64(png(noise(3, (48, 40))))))},
        {**vision, "messages": user("And this one?", ("image", b64(png(gradient((40, 56))))))},
        {**text, "prompt": "the harbour light", "max_tokens": 40, "ignore_eos": True, "temperature": 0,
         "draft_model_id": "draft", "num_draft_tokens": 3},
        {**text, "prompt": "north wind over the sea", "max_tokens": 32, "ignore_eos": True, "temperature": 0.8,
         "seed": 4, "draft_model_id": "draft", "num_draft_tokens": 2},
        {**text, "prompt": "a record:", "max_tokens": 120, "temperature": 0,
         "constraint": {"type": "json_schema", "schema": SCHEMA}},
        {**text, "prompt": "pick one", "max_tokens": 8, "temperature": 0.7, "seed": 9,
         "constraint": {"type": "choice", "options": ["harbour", "lighthouse", "sea"]}},
        {**text, "prompt": "ship wave the a", "max_tokens": 36, "ignore_eos": True, "temperature": 0,
         "logprobs": True},
        {**text, "prompt": "of harbour north", "max_tokens": 30, "ignore_eos": True, "temperature": 0.9,
         "seed": 21, "top_p": 0.9},
    ]


def logprobs(stream) -> list[float]:
    return [lp.logprob for lp in logprob_entries(stream.events)]


@pytest.fixture(scope="module")
def w():
    w = spawn()
    w.load(str(ensure_model("spec-target")), model_id="target")
    w.load(str(ensure_model("spec-draft")), model_id="draft")
    w.load(str(ensure_model("tiny-qwen2-vl")), model_id="vl")
    yield w
    w.close()


@pytest.mark.heavy
def test_eight_different_requests_at_once_each_equal_their_solo_run(w):
    alone = []
    for p in eight():
        s = w.generate(**p)
        s.wait()
        alone.append(s)
    streams = [w.generate(**p) for p in eight()]
    running = []
    waiters = [threading.Thread(target=s.wait) for s in streams]
    for t in waiters:
        t.start()
    while any(t.is_alive() for t in waiters):
        running.append(len(w.status().requests))
    for t in waiters:
        t.join()
    assert max(running) >= 6, f"the eight did not run together: {max(running)}"
    for i, (a, b) in enumerate(zip(alone, streams)):
        assert b.result.tokens == a.result.tokens, i
        assert b.result.stop_reason == a.result.stop_reason, i
        la, lb = logprobs(a), logprobs(b)
        assert len(la) == len(lb) and all(abs(x - y) <= 1e-4 for x, y in zip(la, lb)), i
    assert streams[4].result.stop_reason != "max_tokens", streams[4].result.text
    record = json.loads(streams[4].result.text)
    assert set(record) == {"name", "n"} and isinstance(record["n"], int)
    assert streams[5].result.text in ("harbour", "lighthouse", "sea")
    assert streams[2].result.usage.draft_tokens > 0 and streams[3].result.usage.draft_tokens > 0

"""Batched constraint masks through a real worker: the llguidance-constrained
rows of a decode batch get their masks in one call (constraints/batch_masks.py)
and each row's output is still exactly its solo run's, valid for its
constraint; a row whose constraint fails ends alone.

Alone, a request decodes by itself (its mask filled on its own), so each
"together == alone" pins the batched fill against the per-row one. The worker
runs with debug logs, whose "batched masks" lines show the batched fill ran
(without it, these tests fail there).
"""

from __future__ import annotations

import re
import tempfile
import threading

import jsonschema
import pytest

from conftest import spawn
from constraint_helpers import closing_bias, validate
from mlx_worker import protocol
from mlx_worker.client import RpcError

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "ok": {"type": "boolean"}}, "required": ["n", "ok"],
          "additionalProperties": False}
REGEX = "[a-z]{3,8}( [0-9]{1,4})?"
OPTIONS = ["north", "south", "east", "west wind"]
ARITH = 'start: expr\nexpr: NUMBER | "(" expr ")" | expr OP expr\nOP: "+" | "-"\nNUMBER: /[0-9]{1,3}/\n'
# llguidance gives up on this one after some tokens (too ambiguous): -32007 mid-generation
FAILING = 'start: x\nx: x x | x x x | "a" | "b" | "c" | /[a-z]/'
BATCHED = re.compile(r"batched masks: (\d+) rows filled in one call, (\d+) applied")


@pytest.fixture(scope="module")
def mw(tiny_model):
    log = tempfile.TemporaryFile()
    w = spawn("--log-level=debug", stderr=log)
    w.load(tiny_model, model_id="tiny")
    w.log = log
    yield w
    w.close()
    log.close()


def batched_lines(w) -> list[tuple[int, int]]:
    """(rows filled in one call, rows masked in the batch's logits) per batched step so far."""
    w.log.seek(0)
    text = w.log.read().decode("utf-8", "replace")
    assert "batched masks failed" not in text and "Traceback" not in text, text[-3000:]
    return [(int(a), int(b)) for a, b in BATCHED.findall(text)]


def params(tiny_model) -> list[dict]:
    base = {"model_id": "tiny", "max_tokens": 48, "temperature": 0.9}
    bias = closing_bias(tiny_model)
    return [
        {**base, "prompt": "json one", "seed": 1, "logit_bias": bias,
         "constraint": {"type": "json_schema", "schema": SCHEMA}},
        {**base, "prompt": "json two", "seed": 2, "constraint": {"type": "json_schema", "schema": SCHEMA}},
        {**base, "prompt": "a regex", "seed": 3, "constraint": {"type": "regex", "pattern": REGEX}},
        {**base, "prompt": "a choice", "seed": 4, "constraint": {"type": "choice", "options": OPTIONS}},
        {**base, "prompt": "a grammar", "seed": 5, "repetition_penalty": 1.2,
         "constraint": {"type": "grammar", "lark": ARITH}},
        {**base, "prompt": "greedy regex", "temperature": 0, "constraint": {"type": "regex", "pattern": REGEX}},
        # the per-row path beside the batched one: outlines, and no constraint
        {**base, "prompt": "outlines", "seed": 6, "constraint": {"type": "regex", "pattern": REGEX,
                                                               "engine": "outlines"}},
        {**base, "prompt": "free text", "seed": 7, "ignore_eos": True},
    ]


def check_valid(p: dict, r: protocol.GenerateResult) -> None:
    c = p.get("constraint")
    if c is None or r.stop_reason != "eos":
        return
    assert r.constraint_complete is True, (p, r.text)
    if c["type"] == "json_schema":
        validate(c["schema"], r.text)
    elif c["type"] == "regex":
        assert re.fullmatch(c["pattern"], r.text), r.text
    elif c["type"] == "choice":
        assert r.text in c["options"], r.text
    else:
        assert re.fullmatch(r"[0-9()+\-]+", r.text), r.text


def together(w, ps: list[dict]) -> list:
    """Send all at once; (result or the RpcError) per request."""
    streams = [w.generate(**p) for p in ps]
    out: list = [None] * len(ps)

    def wait(i):
        try:
            out[i] = streams[i].wait()
        except RpcError as e:
            out[i] = e

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return out


def test_constrained_rows_in_one_batch_equal_each_alone(mw, tiny_model):
    ps = params(tiny_model)
    alone = [mw.generate(**p).wait() for p in ps]
    assert batched_lines(mw) == []  # alone: each row's mask on its own
    batch = together(mw, ps)
    for i, (p, a, b) in enumerate(zip(ps, alone, batch)):
        assert isinstance(b, protocol.GenerateResult), (i, b)
        assert b.tokens == a.tokens and b.text == a.text and b.stop_reason == a.stop_reason, (i, p)
        assert b.constraint_complete == a.constraint_complete
        check_valid(p, b)
    assert sum(1 for a in alone if a.stop_reason == "eos") >= 4  # most finished: validated above
    lines = batched_lines(mw)
    # six llguidance rows at most; the outlines row and the free one are never in the call
    assert lines and max(n for n, _ in lines) >= 4 and all(n <= 6 for n, _ in lines), lines
    # rows with sampling processors first (logit_bias, repetition_penalty) apply their own
    assert any(0 < m < n for n, m in lines), lines


def test_a_row_whose_constraint_fails_leaves_the_others_intact(mw, tiny_model):
    ps = params(tiny_model)[:4]
    failing = {"model_id": "tiny", "prompt": "x", "max_tokens": 200, "seed": 0,
               "constraint": {"type": "grammar", "lark": FAILING}}
    alone = [mw.generate(**p).wait() for p in ps]
    before = len(batched_lines(mw))
    batch = together(mw, [failing] + ps)
    err = batch[0]
    assert isinstance(err, RpcError) and err.code == -32007, err
    assert err.data["phase"] == "generation" and err.data["completion_tokens"] > 0
    for i, (p, a, b) in enumerate(zip(ps, alone, batch[1:])):
        assert isinstance(b, protocol.GenerateResult), (i, b)
        assert b.tokens == a.tokens and b.stop_reason == a.stop_reason, (i, p)
        check_valid(p, b)
    assert any(n >= 4 for n, _ in batched_lines(mw)[before:])  # the failing row was in the call
    assert mw.generate(model_id="tiny", prompt="x", max_tokens=8,
                       constraint={"type": "choice", "options": ["still here"]}).wait().text == "still here"


def test_tool_call_rows_share_the_call_with_constrained_rows():
    """Forced tool calls (the lazy tool grammar, while a call is written)
    and a JSON-constrained row of one model: their masks are filled in one
    call; each row equals its run alone and every call's arguments
    validate against the tool's schema."""
    from fixtures.build import ensure_model
    from test_tools import ASK, SCHEMAS, TOOLS

    log = tempfile.TemporaryFile()
    w = spawn("--log-level=debug", stderr=log)
    w.log = log
    try:
        w.load(str(ensure_model("tiny-qwen3-tools")), model_id="q")
        base = {"model_id": "q", "messages": ASK, "max_tokens": 80, "tools": TOOLS, "temperature": 1.0}
        ps = [
            {**base, "tool_choice": "required", "seed": 1},
            {**base, "tool_choice": "required", "seed": 2},
            {**base, "tool_choice": {"name": "search"}, "seed": 3},
            {"model_id": "q", "prompt": "json", "max_tokens": 48, "seed": 4, "temperature": 0.9,
             "constraint": {"type": "json_schema", "schema": SCHEMA}},
        ]
        alone = [w.generate(**p).wait() for p in ps]
        assert batched_lines(w) == []
        batch = together(w, ps)
        for i, (a, b) in enumerate(zip(alone, batch)):
            assert isinstance(b, protocol.GenerateResult), (i, b)
            assert b.tokens == a.tokens and b.stop_reason == a.stop_reason, i
        for r in batch[:3]:
            assert r.tool_calls, r.text
            for c in r.tool_calls:
                jsonschema.Draft202012Validator(SCHEMAS[c.name]).validate(c.arguments)
        assert any(n >= 3 for n, _ in batched_lines(w)), batched_lines(w)
    finally:
        w.close()
        log.close()

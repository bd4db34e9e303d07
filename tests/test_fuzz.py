"""Bad input: arbitrary bytes, broken JSON, odd ids, wrong types, batches,
oversized lines and duplicate ids, all against ONE real worker.

The oracle below is written from JSON-RPC 2.0 itself, not from the worker's
code: a line that is not a JSON object, or whose ``id`` is not a string, an
integer or null, gets exactly one error with ``id: null``; an object without
``id`` is a notification and gets nothing; any other object gets exactly one
response carrying its ``id``. Every fuzz round ends with a sentinel request
that queues behind everything sent before it, so when its answer arrives
every answer owed must have arrived too, and none more.
"""

from __future__ import annotations

import collections
import itertools
import json
import random
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import RawWorker, same_id

MAX_LINE = 4096
GREEDY = {"model_id": "tiny", "prompt": "The sea is", "max_tokens": 8, "temperature": 0, "ignore_eos": True}

# ------------------------------------------------------------------ oracle

NO_REPLY = object()


def _has_surrogate(value) -> bool:
    stack = [value]  # iterative: values may nest ~1000 deep
    while stack:
        v = stack.pop()
        if isinstance(v, str) and any("\ud800" <= c <= "\udfff" for c in v):
            return True
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
    return False


def _reject_constant(name):
    raise ValueError(name)


def nesting_depth(line: bytes) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for byte in line:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


# JSON-RPC sets no nesting limit; the worker's parser gives up near Python's
# recursion limit (1000), so anything nested deeper is a parse error. The
# generators below never nest between 100 and 1500 levels.
MAX_DEPTH = 1000


def expected_reply(line: bytes):
    """NO_REPLY, or the id the one reply to this line must carry."""
    if len(line) > MAX_LINE:
        # Too long: one -32600, with the request's own id if the worker could
        # read it from the line's head, else null; never any other id.
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 20000))  # deep but valid lines still have an id
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):
            return None
        finally:
            sys.setrecursionlimit(limit)
        if isinstance(msg, dict) and _valid_id(msg.get("id")):
            return Either(None, msg["id"])
        return None
    if not line.strip():
        return NO_REPLY  # blank lines are skipped
    if nesting_depth(line) >= MAX_DEPTH:
        return None
    try:
        msg = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None  # parse error
    if _has_surrogate(msg) or not isinstance(msg, dict):
        return None  # invalid UTF-8 in disguise, or not a request object (batches too)
    if "id" not in msg:
        return NO_REPLY  # a notification
    return msg["id"] if _valid_id(msg["id"]) else None


class Either:
    def __init__(self, *ids):
        self.keys = {_id_key(i) for i in ids}


def _valid_id(value) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _id_key(value):
    return (type(value).__name__, json.dumps(value))


def check_response_shape(msg: dict) -> None:
    assert msg.get("jsonrpc") == "2.0", msg
    assert ("result" in msg) != ("error" in msg), msg
    assert set(msg) <= {"jsonrpc", "id", "result", "error"}, msg
    if "error" in msg:
        err = msg["error"]
        assert isinstance(err.get("code"), int) and not isinstance(err["code"], bool), msg
        assert isinstance(err.get("message"), str) and err["message"], msg


_sentinels = itertools.count()


def exchange(w: RawWorker, chunks: list[bytes]) -> list[dict]:
    """Send chunks (each ends with a newline), then prove the replies add up."""
    start = len(w.messages)
    owed: collections.Counter = collections.Counter()
    either: list[set] = []
    for chunk in chunks:
        for line in chunk.split(b"\n"):
            expected = expected_reply(line)
            if isinstance(expected, Either):
                either.append(expected.keys)
            elif expected is not NO_REPLY:
                owed[_id_key(expected)] += 1
        w.send(chunk + b"\n", newline=False)
    sentinel = f"sentinel-{next(_sentinels)}"
    # tokenize is taken by the compute thread after every job queued before
    # it; generates may still be running (batched): wait until none is.
    w.request("tokenize", {"model_id": "tiny", "text": "ok"}, id=sentinel)
    reply = w.response(sentinel, timeout=60)
    assert "result" in reply, reply
    deadline = time.monotonic() + 60
    for i in itertools.count():
        status = w.call("status", {}, id=f"{sentinel}-status-{i}")["result"]["queue"]
        if not status["running"] and not status["pending"] or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    with w.cond:
        got = [m for m in w.messages[start:] if "method" not in m and not str(m.get("id")).startswith(sentinel)]
        events = [m for m in w.messages[start:] if "method" in m]
    for m in got:
        check_response_shape(m)
    left = collections.Counter(_id_key(m.get("id")) for m in got)
    left.subtract(owed)
    assert all(n >= 0 for n in left.values()), ("missing replies", chunks, got)
    for keys in either:
        key = next((k for k in sorted(keys, key=lambda k: k[0] == "NoneType") if left[k] > 0), None)
        assert key is not None, ("missing reply to an oversized line", chunks, got)
        left[key] -= 1
    assert not +left, ("extra replies", chunks, got)
    for event in events:
        assert event["method"] in ("token", "progress"), event
    assert w.alive()
    assert not w.bad_lines, w.bad_lines[:3]
    return got


@pytest.fixture(scope="module")
def fuzz_worker(tiny_model):
    w = RawWorker("--max-line-bytes", str(MAX_LINE))
    reply = w.call("load", {"model": tiny_model, "model_id": "tiny"})
    assert "result" in reply, reply
    reference = w.call("generate", GREEDY)["result"]["tokens"]
    w.reference = reference
    yield w
    w.close()
    assert not w.bad_lines


# -------------------------------------------------------------- strategies

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=10**30, max_value=10**400),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
ids = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63),
    st.integers(min_value=2**63, max_value=10**60),
    st.text(max_size=16),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(scalars, max_size=2),
    st.dictionaries(st.text(max_size=3), scalars, max_size=2),
)

TEMPLATES = {
    "generate": GREEDY,
    "tokenize": {"model_id": "tiny", "text": "hello"},
    "detokenize": {"model_id": "tiny", "tokens": [10, 11, 12]},
    "status": {},
    "cancel": {"id": 424242},
}
methods = st.one_of(
    st.sampled_from(sorted(TEMPLATES) + ["no_such_method", "", "GENERATE", "rpc.discover"]),
    json_values,
)


@st.composite
def params_for(draw, method):
    base = dict(TEMPLATES.get(method, {}) if isinstance(method, str) else {})
    how = draw(st.sampled_from(["valid", "wrong_type", "unknown_field", "replace", "absent"]))
    if how == "wrong_type" and base:
        field = draw(st.sampled_from(sorted(base)))
        value = draw(json_values)
        if field == "max_tokens" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # a valid int could make a long generation
        base[field] = value
    elif how == "unknown_field":
        base[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    elif how == "replace":
        return draw(json_values)
    elif how == "absent":
        return None
    return base


@st.composite
def requests(draw):
    method = draw(methods)
    message = {}
    if draw(st.booleans()):
        message["jsonrpc"] = "2.0" if draw(st.integers(0, 4)) else draw(json_values)
    message["method"] = method
    if draw(st.integers(0, 5)):  # mostly requests, sometimes notifications
        message["id"] = draw(ids)
    params = draw(params_for(method))
    if params is not None:
        message["params"] = params
    if draw(st.booleans()):
        message = dict(draw(st.permutations(list(message.items()))))
    return json.dumps(message).encode()


def nested(depth: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return open_ * depth + close * depth


@st.composite
def mangled(draw):
    line = draw(requests())
    how = draw(st.sampled_from(["truncate", "splice", "batch", "deep", "huge_number", "none"]))
    if how == "truncate":
        return line[: draw(st.integers(0, max(0, len(line) - 1)))]
    if how == "splice":
        at = draw(st.integers(0, len(line)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00", b"\\", b'"', b"\xef\xbb\xbf"]))
        return line[:at] + junk + line[at:]
    if how == "batch":
        items = draw(st.lists(requests(), max_size=3))
        return b"[" + b",".join(items) + b"]"
    if how == "deep":
        depth = draw(st.one_of(st.integers(1, 60), st.integers(1500, 3000)))
        kind = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        inner = kind[0] * depth + b"1" + kind[1] * depth if kind[0] != b"[" else nested(depth)
        rid = draw(st.integers(0, 10**6))
        return b'{"jsonrpc":"2.0","id":%d,"method":"status","params":{"x":%s}}' % (rid, inner)
    if how == "huge_number":
        number = draw(st.sampled_from([b"1" + b"0" * 500, b"-" + b"9" * 200, b"1e400", b"-1e-400", b"123456789012345678901234567890.5"]))
        field = draw(st.sampled_from([b'"id"', b'"max_tokens"', b'"temperature"', b'"seed"']))
        return b'{"jsonrpc":"2.0","method":"generate","id":"h","params":{"model_id":"tiny","prompt":"x","max_tokens":2,%s:%s}}' % (
            field, number
        ) if field != b'"id"' else b'{"jsonrpc":"2.0","method":"status","id":%s}' % number
    return line


lines = st.one_of(requests(), mangled(), st.binary(max_size=120))


# ------------------------------------------------------------------- tests


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(chunks=st.lists(lines, min_size=1, max_size=6))
def test_fuzzed_lines_get_exactly_the_replies_owed(fuzz_worker, chunks):
    exchange(fuzz_worker, chunks)


def random_line(rng: random.Random) -> bytes:
    """A seeded, hypothesis-free generator of hostile lines (a few hundred per run)."""
    kind = rng.randrange(9)
    rid = rng.choice([rng.randrange(-(2**40), 2**40), f"r{rng.random()}", None, True, 1.5, [1], {"a": 1}, 2**64 + 1])
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 1:
        base = json.dumps({"jsonrpc": "2.0", "id": rid, "method": "tokenize", "params": {"model_id": "tiny", "text": "abc"}}).encode()
        return base[: rng.randrange(len(base))]
    if kind == 2:
        return b'{"jsonrpc":"2.0","id":%s,"method":"tokenize","params":{"model_id":"tiny","text":"a\xff\xfeb"}}' % json.dumps(rid).encode()
    if kind == 3:
        return b'{"jsonrpc":"2.0","id":%d,"method":"status","params":%s}' % (rng.randrange(10**6), nested(rng.choice([5, 999, 2500])))
    if kind == 4:
        params = dict(GREEDY)
        params[rng.choice(sorted(params))] = rng.choice(["x", 1.25, None, [], {}, True, -1, 10**40])
        if not isinstance(params["max_tokens"], int) or isinstance(params["max_tokens"], bool) or params["max_tokens"] > 8:
            params["max_tokens"] = rng.choice(["x", 2.5, None])
        return json.dumps({"jsonrpc": "2.0", "id": rid, "method": "generate", "params": params}).encode()
    if kind == 5:
        return json.dumps([{"jsonrpc": "2.0", "id": i, "method": "status"} for i in range(rng.randrange(3))]).encode()
    if kind == 6:
        return json.dumps({"jsonrpc": "2.0", "method": rng.choice(["status", "cancel", "generate", "nope"]), "params": {"id": 1}}).encode()
    if kind == 7:
        return json.dumps({"jsonrpc": rng.choice(["1.0", 2, None]), "id": rid, "method": "status"}).encode()
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": rng.choice([1, None, ["x"], "x" * rng.randrange(1, 5000)])}).encode()


def test_random_line_generator(fuzz_worker):
    rng = random.Random(20240611)
    sent = 0
    while sent < 300:
        batch = [random_line(rng) for _ in range(rng.randrange(1, 8))]
        exchange(fuzz_worker, batch)
        sent += len(batch)


def test_oversized_lines_are_answered_and_skipped(fuzz_worker):
    w = fuzz_worker
    pad = "x" * (MAX_LINE * 25)
    head_id = json.dumps({"id": 77, "jsonrpc": "2.0", "method": "generate", "params": {"prompt": pad}}).encode()
    tail_id = json.dumps({"jsonrpc": "2.0", "method": "generate", "params": {"prompt": pad}, "id": 78}).encode()
    # An "id" nested inside params must not be taken for the request's id.
    nested_id = json.dumps({
        "jsonrpc": "2.0", "method": "generate",
        "params": {"messages": [{"role": "assistant", "tool_calls": [{"id": "call_1"}]}, {"role": "user", "content": pad}]},
        "id": 79,
    }).encode()
    string_id = json.dumps({"id": "big-one", "params": {"text": pad}}).encode()
    just_bytes = b"\xff" * (MAX_LINE * 3)
    got = exchange(w, [head_id, tail_id, nested_id, string_id, just_bytes])
    assert sorted(map(_id_key, (m["id"] for m in got))) == sorted(map(_id_key, [77, None, None, "big-one", None]))
    for m in got:
        assert m["error"]["code"] == -32600
        assert m["error"]["data"]["max_line_bytes"] == MAX_LINE
    assert w.ready["capabilities"]["max_line_bytes"] == MAX_LINE


def test_oversized_line_is_never_held_whole(fuzz_worker):
    """32 MiB without a newline, in pieces, then a valid request in the same
    write as the newline: one -32600, the request answered, RSS flat."""
    w = fuzz_worker
    before = w.call("status", {})["result"]["memory"]["rss"]
    # An id no fuzzed line can have used on this shared worker (hypothesis may have sent id 5).
    piece = b'{"id":"held-whole","method":"status","params":{"x":"' + b"y" * (1 << 20)
    w.send(piece, newline=False)
    for _ in range(31):
        w.send(b"z" * (1 << 20), newline=False)
    w.send(b'"}}\n{"jsonrpc":"2.0","id":"after","method":"status"}\n', newline=False)
    err = w.response("held-whole")
    assert err["error"]["code"] == -32600
    assert err["error"]["data"]["max_line_bytes"] == MAX_LINE
    assert "result" in w.response("after")
    after = w.call("status", {})["result"]["memory"]["rss"]
    assert after - before < 8 * 2**20, (before, after)


def test_batches_are_refused_without_running_anything(fuzz_worker):
    w = fuzz_worker
    start = len(w.messages)
    batch = [
        {"jsonrpc": "2.0", "id": "b1", "method": "generate", "params": GREEDY},
        {"jsonrpc": "2.0", "id": "b2", "method": "status"},
    ]
    got = exchange(w, [json.dumps(batch).encode(), b"[]", b"  [1,2,3]"])
    assert [m["error"]["code"] for m in got] == [-32600] * 3
    assert all(m["id"] is None for m in got)
    assert "batch" in got[0]["error"]["message"]
    assert not [m for m in w.messages[start:] if m.get("method") == "token"]


def test_notifications_get_no_reply(fuzz_worker):
    w = fuzz_worker
    quiet = [
        {"jsonrpc": "2.0", "method": "status"},
        {"jsonrpc": "2.0", "method": "cancel", "params": {"id": 1}},
        {"jsonrpc": "2.0", "method": "tokenize", "params": {"model_id": "tiny", "text": "a"}},
        {"jsonrpc": "2.0", "method": "generate", "params": GREEDY},
        {"jsonrpc": "2.0", "method": "no_such_method"},
        {"jsonrpc": "2.0", "method": "tokenize", "params": {"bogus": 1}},
        {"jsonrpc": "1.0", "method": "status"},
        {"method": 5},
    ]
    start = len(w.messages)
    got = exchange(w, [json.dumps(m).encode() for m in quiet])
    assert got == []
    assert not [m for m in w.messages[start:] if m.get("method") == "token"]


def test_every_json_type_as_id(fuzz_worker):
    w = fuzz_worker
    cases = [0, -1, 2**63 - 1, 2**64, -(2**70), "", "7", "ünï 😀", None, True, False, 1.0, 1.5, [], [1], {}, {"id": 1}]
    got = exchange(w, [json.dumps({"jsonrpc": "2.0", "id": c, "method": "status"}).encode() for c in cases])
    by_key = collections.defaultdict(list)
    for m in got:
        by_key[_id_key(m["id"])].append(m)
    for c in cases:
        if _valid_id(c):
            assert any("result" in m for m in by_key[_id_key(c)]), c
    invalid = [m for m in by_key[_id_key(None)] if "error" in m]
    assert len(invalid) == 8 and all(m["error"]["code"] == -32600 for m in invalid)
    assert all(m["error"]["data"]["field"] == "id" for m in invalid)


def test_wrong_param_types_name_the_field(fuzz_worker):
    w = fuzz_worker
    cases = {
        "max_tokens": "many",
        "temperature": "hot",
        "tokens": [1, "two"],
        "stop": 5,
        "logit_bias": [1],
        "seed": 1.5,
    }
    for field, value in cases.items():
        params = {"model_id": "tiny", "prompt": "x", "max_tokens": 2}
        params.pop("prompt") if field == "tokens" else None
        params[field] = value
        reply = w.call("generate", params)
        assert reply["error"]["code"] == -32602, reply
        assert reply["error"]["data"]["field"].startswith(f"params.{field}"), reply


def test_duplicate_in_flight_id_is_refused_and_the_first_unaffected(fuzz_worker):
    w = fuzz_worker
    start = len(w.messages)
    w.request("generate", dict(GREEDY, max_tokens=100000), id="dup")
    w.wait_for(lambda m: m.get("method") == "token" and m["params"]["id"] == "dup", start=start)
    w.request("generate", GREEDY, id="dup")
    w.request("tokenize", {"model_id": "tiny", "text": "t"}, id="dup")
    w.wait_for(lambda m: "error" in m and m.get("id") == "dup", start=start)
    w.request("cancel", {"id": "dup"}, id="cancel-dup")
    assert w.response("cancel-dup")["result"] == {"cancelled": True}
    final = w.wait_for(lambda m: "result" in m and m.get("id") == "dup", start=start)
    assert final["result"]["stop_reason"] == "cancelled"
    assert len(final["result"]["tokens"]) < 1000
    time.sleep(0.2)
    replies = [m for m in w.messages[start:] if "method" not in m and m.get("id") == "dup"]
    assert len(replies) == 3  # two refusals and the first request's own result
    refusals = [m for m in replies if "error" in m]
    assert len(refusals) == 2
    assert all(m["error"]["code"] == -32600 and m["error"]["data"]["field"] == "id" for m in refusals)
    streamed = "".join(m["params"]["text"] for m in w.messages[start:] if m.get("method") == "token" and m["params"]["id"] == "dup")
    assert streamed == final["result"]["text"]


def test_an_id_may_be_reused_once_answered(fuzz_worker):
    """A host that reuses an id as soon as its answer arrives must never be
    told the id is still in flight."""
    w = fuzz_worker
    for i in range(300):
        method, params = (("detokenize", {"model_id": "tiny", "tokens": [i % 900 + 10]}) if i % 2
                          else ("tokenize", {"model_id": "tiny", "text": "again"}))
        start = len(w.messages)
        w.request(method, params, id="same")
        reply = w.wait_for(lambda m: "method" not in m and m.get("id") == "same", start=start)
        assert "result" in reply, (i, reply)


def test_a_normal_generate_works_after_all_that(fuzz_worker):
    w = fuzz_worker
    reply = w.call("generate", GREEDY)
    assert reply["result"]["tokens"] == w.reference
    status = w.call("status", {})["result"]
    assert status["queue"]["pending"] == 0 and status["queue"]["active"] is None
    err = w.stderr()
    assert "Traceback" not in err, err[err.find("Traceback") - 300 :][:3000]


EXTREMES = [-1, 0, 2**31, 2**63, 2**64, 10**30, -(10**30), 1e308, -1e308, 5e-324]
NUMERIC_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                  "repetition_context_size", "presence_penalty", "frequency_penalty", "seed",
                  "top_logprobs", "prefill_step_size"]


def test_extreme_numbers_are_answered_without_internal_errors(fuzz_worker):
    """Every numeric generate param at the edges of int64/uint64/float: a
    result or a named invalid-params error, never -32603."""
    w = fuzz_worker
    for field in NUMERIC_FIELDS:
        for value in EXTREMES:
            if field == "max_tokens" and isinstance(value, int) and value > 8:
                continue  # valid, just long
            params = {"model_id": "tiny", "prompt": "x", "max_tokens": 3, field: value}
            reply = w.call("generate", params)
            if "error" in reply:
                assert reply["error"]["code"] == -32602, (field, value, reply)
                assert reply["error"]["data"]["field"].startswith(f"params.{field}"), (field, value, reply)
    for field, value in [("logit_bias", {"5": 1e308}), ("logit_bias", {"5": -1e308}), ("logit_bias", {"99999999999999999999": 1}),
                         ("stop_token_ids", [2**64]), ("tokens", [2**64]), ("tokens", [-1])]:
        params = {"model_id": "tiny", "max_tokens": 3, field: value}
        params.setdefault("tokens", None) if field != "tokens" else None
        if field != "tokens":
            params["prompt"] = "x"
            params.pop("tokens")
        reply = w.call("generate", params)
        if "error" in reply:
            assert reply["error"]["code"] == -32602, (field, value, reply)

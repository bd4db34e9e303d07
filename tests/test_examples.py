"""Replay protocol/examples/*.jsonl against a real worker (rules in their README)."""

from __future__ import annotations

import json
import queue
from pathlib import Path

import msgspec
import pytest

from conftest import ROOT, spawn
from fixtures.build import ensure_model

EXAMPLES = sorted((ROOT / "protocol" / "examples").glob("*.jsonl"))
TYPES = {"$str": str, "$int": int, "$num": (int, float), "$list": list, "$obj": dict}


def matches(expected, actual, path="$") -> list[str]:
    if isinstance(expected, str) and expected in TYPES:
        ok = isinstance(actual, TYPES[expected]) and not isinstance(actual, bool)
        return [] if ok else [f"{path}: expected {expected}, got {actual!r}"]
    if expected == "$any":
        return []
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected an object, got {actual!r}"]
        # A key written "name?" may be absent (a field sent only sometimes, e.g. a race decides).
        known = {k[:-1] if k.endswith("?") else k for k in expected}
        problems = [f"{path}: unexpected keys {sorted(set(actual) - known)}"] if set(actual) - known else []
        for key, value in expected.items():
            optional, key = key.endswith("?"), key.rstrip("?")
            if key not in actual:
                if not optional:
                    problems.append(f"{path}.{key}: missing")
            else:
                problems += matches(value, actual[key], f"{path}.{key}")
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: expected {expected!r}, got {actual!r}"]
        return [p for i, (e, a) in enumerate(zip(expected, actual)) for p in matches(e, a, f"{path}[{i}]")]
    return [] if expected == actual and type(expected) is type(actual) else [f"{path}: expected {expected!r}, got {actual!r}"]


def substitute(value):
    if isinstance(value, str) and value.startswith("$fixture:"):
        return str(ensure_model(value.split(":", 1)[1]))
    if isinstance(value, dict):
        return {k: substitute(v) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v) for v in value]
    return value


def blocks(lines):
    """Split a transcript into (sent line or None, [expected entries])."""
    current_send, expected = None, []
    for entry in lines:
        if "->" in entry:
            yield current_send, expected
            current_send, expected = entry["->"], []
        else:
            expected.append(entry)
    yield current_send, expected


class RawWorker:
    """Reads the worker's stdout lines ourselves: the transcript is the truth."""

    def __init__(self):
        self.client = spawn()
        self.inbox: queue.Queue = queue.Queue()
        for line in self.client.lines:
            self.inbox.put(json.loads(line))
        self.seen = len(self.client.lines)

    def next(self, timeout=30.0):
        import time

        deadline = time.monotonic() + timeout
        while self.seen >= len(self.client.lines):
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not send an expected message")
            time.sleep(0.005)
        line = self.client.lines[self.seen]
        self.seen += 1
        return json.loads(line)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_transcript_replays(path: Path):
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    raw = RawWorker()
    # The client consumed the ready line already; check it against the first block.
    ready = json.loads(raw.client.lines[0])
    try:
        for sent, expected in blocks(entries):
            if sent is not None:
                raw.client.send_line(sent.encode() if isinstance(sent, str) else msgspec.json.encode(substitute(sent)))
            responses = [e["<-"] for e in expected if "<-" in e and "method" not in e["<-"]]
            notes = [(k, e[k]) for e in expected for k in ("<-", "<-?") if k in e and "method" in e[k]]
            if sent is None:  # the ready block
                assert not matches(expected[0]["<-"], ready), matches(expected[0]["<-"], ready)
                continue
            pending = {json.dumps(r["id"]): r for r in responses}
            required = {i for i, (k, _) in enumerate(notes) if k == "<-"}
            while pending:
                msg = raw.next()
                if "method" in msg:
                    hits = [i for i, (_, n) in enumerate(notes)
                            if n["method"] == msg["method"] and not matches(n, msg)]
                    assert hits, f"{path.name}: unexpected notification {msg}"
                    required -= set(hits)
                    continue
                key = json.dumps(msg.get("id"))
                assert key in pending, f"{path.name}: unexpected response {msg}"
                problems = matches(pending.pop(key), msg)
                assert not problems, f"{path.name}: {problems}"
            assert not required, f"{path.name}: expected notifications never came: {[notes[i] for i in required]}"
    finally:
        raw.client.close()

"""Merging token events while the host stalls costs time linear in the
number of events (the writer may hold many thousands after a long stall).

The real worker cannot produce enough events in a test's time to tell
linear from quadratic, so this drives the writer's merge step directly,
with the protocol's own messages; tests/test_faults.py checks merging
through a real worker with a stalled host.
"""

from __future__ import annotations

import time

import msgspec

from mlx_worker import protocol
from mlx_worker.token_merging import coalesce


def token(rid, i, logprobs=True):
    event = protocol.TokenEvent(id=rid, text=f"<{i}>", tokens=[i], channel="content")
    if logprobs:
        event.logprobs = [protocol.TokenLogprob(token=i, logprob=-float(i))]
    return protocol.Notification("token", event)


def merge_seconds(n: int) -> float:
    batch = [token("g", i) for i in range(n)]
    start = time.perf_counter()
    out = coalesce(batch)
    elapsed = time.perf_counter() - start
    assert len(out) == 1 and out[0].params.tokens == list(range(n))
    return elapsed


def test_merging_is_linear():
    small = min(merge_seconds(10_000) for _ in range(3))
    big = min(merge_seconds(40_000) for _ in range(2))
    # 4 x the events: about 4 x the time when linear, 16 x when quadratic.
    assert big < 8 * small + 0.05, (small, big)


def test_merging_keeps_order_and_content():
    reply = protocol.Response(id="t", result=protocol.CancelResult(cancelled=False))
    batch = [token("a", 0), token("a", 1), token("b", 2, logprobs=False), token("b", 3, logprobs=False),
             reply, token("a", 4), token("a", 5)]
    out = coalesce(batch)
    assert [getattr(m, "method", None) for m in out] == ["token", "token", None, "token"]
    a, b, _, a2 = (m.params if m is not reply else m for m in out)
    assert (a.id, a.text, a.tokens, [lp.token for lp in a.logprobs]) == ("a", "<0><1>", [0, 1], [0, 1])
    assert (b.id, b.text, b.tokens) == ("b", "<2><3>", [2, 3]) and b.logprobs is msgspec.UNSET
    assert (a2.text, a2.tokens, [lp.token for lp in a2.logprobs]) == ("<4><5>", [4, 5], [4, 5])
    assert out[2] is reply

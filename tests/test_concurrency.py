"""200 interleaved generate / cancel / tokenize / status requests from
several threads, with seeded random timing, against one worker.

Checked on the raw stdout lines (not through the client's routing): every
request gets exactly one final response, every event carries the id of a
generate that was sent, each generate's events add up to its own result,
and an uncancelled generate's tokens equal a quiet re-run with the same
seed, so nothing leaked from one request into another.
"""

from __future__ import annotations

import collections
import json
import random
import threading
import time

import pytest

from conftest import spawn
from mlx_worker import protocol
from mlx_worker.client import RpcError

THREADS = 4
PER_THREAD = 50
WORDS = "sea ship wind wave { } [ ] : , 1 2 é 中 😀 the a of".split()


@pytest.fixture(scope="module")
def storm_worker(tiny_model):
    w = spawn()
    w.load(tiny_model, model_id="tiny")
    yield w
    w.close()


def generate_params(rng: random.Random) -> dict:
    p = {
        "model_id": "tiny",
        "max_tokens": rng.randint(1, 30),
        "seed": rng.randrange(1 << 31),
        "temperature": rng.choice([0, 0.7, 1.0]),
    }
    if rng.random() < 0.7:
        p["prompt"] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    else:
        p["messages"] = [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))}]
    if rng.random() < 0.3:
        p["ignore_eos"] = True
    if rng.random() < 0.2:
        p["top_logprobs"] = 2
    if rng.random() < 0.2:
        p["stop"] = [rng.choice(WORDS)]
    return p


@pytest.mark.heavy
def test_interleaved_requests_from_many_threads(storm_worker):
    w = storm_worker
    start_line = len(w.lines)
    lock = threading.Lock()
    generates: dict = {}  # id -> (params, stream)
    cancelled_true: set = set()
    sent = collections.Counter()  # updated under `lock`
    errors: list = []
    live: list = []  # generate ids that may still be running, for cross-thread cancels

    def count(kind: str) -> None:
        with lock:
            sent[kind] += 1

    def worker_thread(seed: int) -> None:
        rng = random.Random(seed)
        pending = []
        try:
            for _ in range(PER_THREAD):
                time.sleep(rng.uniform(0, 0.01))
                op = rng.random()
                if op < 0.45:
                    params = generate_params(rng)
                    stream = w.generate(**params)
                    with lock:
                        generates[stream.id] = (params, stream)
                        live.append(stream.id)
                    count("generate")
                    pending.append(stream)
                    if rng.random() < 0.3:  # cancel our own after a random delay
                        time.sleep(rng.uniform(0, 0.03))
                        if stream.cancel():
                            with lock:
                                cancelled_true.add(stream.id)
                        count("cancel")
                elif op < 0.60:
                    with lock:
                        target = rng.choice(live) if live else 12345678
                    if w.cancel(target):  # possibly another thread's request
                        with lock:
                            cancelled_true.add(target)
                    count("cancel")
                elif op < 0.80:
                    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
                    assert w.tokenize(model_id="tiny", text=text).count > 0
                    count("tokenize")
                else:
                    status = w.status()
                    assert status.queue.pending <= status.queue.max_pending
                    count("status")
                if pending and (len(pending) > 4 or rng.random() < 0.2):
                    pending.pop(0).wait()
            for stream in pending:
                stream.wait()
        except Exception as exc:  # surfaced below with its thread's seed
            errors.append((seed, repr(exc)))

    threads = [threading.Thread(target=worker_thread, args=(1000 + i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert sum(sent.values()) >= THREADS * PER_THREAD

    # ---- what actually crossed the wire
    msgs = [json.loads(line) for line in w.lines[start_line:]]
    finals = collections.Counter(m["id"] for m in msgs if "method" not in m)
    assert all(n == 1 for n in finals.values()), [k for k, n in finals.items() if n > 1]
    assert sum(finals.values()) == sum(sent.values())
    assert w.unrouted.empty()
    texts, tokens = collections.defaultdict(str), collections.defaultdict(list)
    for m in msgs:
        if m.get("method") == "token":
            rid = m["params"]["id"]
            assert rid in generates, f"token event for an id that is not a generate: {rid!r}"
            texts[rid] += m["params"]["text"]
            tokens[rid] += m["params"]["tokens"]
        elif m.get("method") == "progress":
            assert m["params"]["id"] in generates

    kept = []
    for rid, (params, stream) in generates.items():
        result = stream.result
        assert result is not None and finals[rid] == 1
        assert texts[rid] == result.text, rid
        assert tokens[rid] == result.tokens, rid
        if rid in cancelled_true:
            assert result.stop_reason == "cancelled", rid
        elif result.stop_reason != "cancelled":
            kept.append((params, result))
    print(f"\nsent {dict(sent)}; {len(kept)} finished, {len(cancelled_true)} cancelled")
    assert len(kept) >= 40 and len(cancelled_true) >= 5, (len(kept), len(cancelled_true))

    # ---- quiet re-runs: the same seed gives the same tokens
    for params, result in kept:
        again = w.generate(**params).wait()
        assert again.tokens == result.tokens, params
        assert again.text == result.text
        assert again.stop_reason == result.stop_reason


def test_cancel_storm_on_one_generation(storm_worker):
    """Many threads cancel the same generation at once: every answer is
    honoured, the generation reports cancelled once, later cancels say false."""
    w = storm_worker
    stream = w.generate(model_id="tiny", prompt="go", max_tokens=100_000, ignore_eos=True)
    next(iter(stream))  # running
    answers, barrier = [], threading.Barrier(8)

    def cancel():
        barrier.wait()
        answers.append(w.cancel(stream.id))

    threads = [threading.Thread(target=cancel) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers.count(True) >= 1
    assert stream.wait().stop_reason == "cancelled"
    with pytest.raises(RpcError):
        w.call("cancel", {"id": [1]})
    assert w.cancel(stream.id) is False
    assert isinstance(w.status(), protocol.StatusResult)

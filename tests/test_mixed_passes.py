"""Mixed passes through a real worker: a prompt's chunks ride along in the
decoding rows' forward pass (engine/packed.py, engine/layouts.py), and
nothing anyone receives changes.

The rides are seen in the worker's debug log ("mixed pass: ..."); every
output is compared with the same request run alone, and with a worker whose
batches keep mlx-lm's BatchKVCache (MLX_WORKER_PACKED=0, the bench switch).
"""

from __future__ import annotations

import tempfile
import threading

import pytest

from conftest import logprob_entries, spawn, worker_env
from fixtures.build import ensure_model
from mlx_worker import protocol

WORDS = "sea ship wind wave the a of harbour north light { } : 1 2".split()


def prompt(i: int, n: int = 10) -> str:
    return " ".join(WORDS[(i * 5 + k * 3) % len(WORDS)] for k in range(n + 3 * i))


def rows(model_id: str) -> list[dict]:
    base = {"model_id": model_id, "ignore_eos": True, "prompt_cache": False}
    return [
        {**base, "prompt": prompt(0), "max_tokens": 70, "temperature": 0, "logprobs": True},
        {**base, "prompt": prompt(1), "max_tokens": 60, "temperature": 0.9, "seed": 5},
        {**base, "prompt": prompt(2), "max_tokens": 50, "temperature": 0, "top_logprobs": 2},
    ]


def long_prompt(model_id: str, n: int = 900) -> dict:
    tokens = [(7 * k) % 300 + 20 for k in range(n)]
    return {"model_id": model_id, "tokens": tokens, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "prompt_cache": False}


def logprobs(stream) -> list[float]:
    return [lp.logprob for lp in logprob_entries(stream.events)]


def until_token(stream) -> None:
    for event in stream:
        if isinstance(event, protocol.TokenEvent) and event.tokens:
            return


def run(w, params: dict):
    s = w.generate(**params)
    s.wait()
    return s


def same(alone, together, what, tol: float = 1e-4) -> None:
    """Two finished streams: same tokens and stop reason, logprobs within ``tol``."""
    assert together.result.tokens == alone.result.tokens, what
    assert together.result.stop_reason == alone.result.stop_reason, what
    a, b = logprobs(alone), logprobs(together)
    assert len(a) == len(b), what
    assert all(abs(x - y) <= tol for x, y in zip(a, b)), (what, max(abs(x - y) for x, y in zip(a, b)))


def decoding_then_prompt(w, model_id: str, n_long: int = 900) -> list:
    """Start the rows, wait until each streams, then send a long prompt (its
    stream last). Returns the finished streams."""
    streams = [w.generate(**p) for p in rows(model_id)]
    for s in streams:
        until_token(s)
    streams.append(w.generate(**long_prompt(model_id, n_long)))
    waiters = [threading.Thread(target=s.wait) for s in streams]
    for t in waiters:
        t.start()
    for t in waiters:
        t.join()
    return streams


@pytest.fixture(scope="module")
def logged(tiny_model):
    log = tempfile.TemporaryFile()
    w = spawn("--log-level", "debug", stderr=log)
    w.load(tiny_model, model_id="tiny")
    yield w, log
    w.close()


def log_text(log) -> str:
    log.seek(0)
    return log.read().decode("utf-8", "replace")


def test_a_prompt_rides_along_and_every_output_is_its_solo_run(logged):
    w, log = logged
    alone = [run(w, p) for p in rows("tiny") + [long_prompt("tiny")]]
    before = log_text(log).count("mixed pass:")
    together = decoding_then_prompt(w, "tiny")
    rides = log_text(log).count("mixed pass:") - before
    assert rides >= 3, "the long prompt never rode along in the decode step"
    for i, (a, b) in enumerate(zip(alone, together)):
        same(a, b, i)


def test_a_cancelled_rider_leaves_the_rows_as_they_were(logged):
    w, log = logged
    alone = [run(w, p) for p in rows("tiny")]
    streams = [w.generate(**p) for p in rows("tiny")]
    for s in streams:
        until_token(s)
    rider = w.generate(**long_prompt("tiny", 3000))
    seen = 0
    for event in rider:  # progress events: it is being prefilled
        seen += 1
        if seen >= 3:
            break
    assert rider.cancel() is True
    assert rider.wait().stop_reason == "cancelled"
    for i, (a, s) in enumerate(zip(alone, streams)):
        s.wait()
        same(a, s, i)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama-q4", "tiny-llama-bf16"])
def test_packed_batches_equal_mlx_lm_batches(name):
    """The same rows and rider on a worker whose batches are BatchKVCache:
    tokens equal; logprobs within the spec's bound for the dtype."""
    path = str(ensure_model(name))
    out = {}
    for packed in ("1", "0"):
        env = {**worker_env(), "MLX_WORKER_PACKED": packed}
        w = spawn(env=env)
        try:
            w.load(path, model_id="m")
            out[packed] = decoding_then_prompt(w, "m", 400)
        finally:
            w.close()
    tol = 2e-2 if "bf16" in name else 1e-4
    for i, (a, b) in enumerate(zip(out["0"], out["1"])):
        same(a, b, (name, i), tol)


def test_several_prompts_ride_along_together_with_uneven_chunks(logged):
    """Five prompts sent together while rows decode, in chunks of 4 tokens
    (prefill_step_size), so that some have 1 token left while others have
    4: they ride along in the same passes (a one-token chunk ahead of a
    longer one) and each equals its solo run."""
    w, log = logged
    prompts = [{"model_id": "tiny", "tokens": [(11 * k + 3 * i) % 300 + 20 for k in range(n)], "max_tokens": 6,
                "temperature": 0, "logprobs": True, "prompt_cache": False, "prefill_step_size": 4}
               for i, n in enumerate([6, 14, 9, 22, 30])]
    alone = [run(w, p) for p in rows("tiny") + prompts]
    before = log_text(log)
    streams = [w.generate(**p) for p in rows("tiny")]
    for s in streams:
        until_token(s)
    streams += [w.generate(**p) for p in prompts]
    for s in streams:
        s.wait()
    rides = [line for line in log_text(log)[len(before):].splitlines() if "mixed pass:" in line]
    assert any("(1 prompts)" not in line for line in rides), "the prompts never rode along together"
    for i, (a, b) in enumerate(zip(alone, streams)):
        same(a, b, i)


def test_a_row_joins_a_shared_segment_that_is_down_to_one_row(logged):
    """Two requests join together (one shared cache), one ends at once; a
    third of about the same depth then joins the one left (merged into its
    shared cache): every output equals its solo run."""
    w, _ = logged
    base = {"model_id": "tiny", "temperature": 0, "ignore_eos": True, "prompt_cache": False, "logprobs": True}
    pair = [{**base, "tokens": [20 + k for k in range(24)], "max_tokens": 120},
            {**base, "tokens": [30 + k for k in range(24)], "max_tokens": 2}]
    third = {**base, "tokens": [40 + k for k in range(30)], "max_tokens": 5}
    alone = [run(w, p) for p in pair + [third]]
    streams = [w.generate(**p) for p in pair]
    streams[1].wait()
    until_token(streams[0])
    streams.append(w.generate(**third))
    for s in streams:
        s.wait()
    for i, (a, b) in enumerate(zip(alone, streams)):
        same(a, b, i)


def test_a_self_check_that_runs_out_of_memory_is_asked_again(tiny_model):
    """The packed passes' one-time check (engine/packed.py) fails at load
    with an allocation failure (MLX_WORKER_FAULTS="selfcheck@1"): that
    decides nothing, so the first batch asks again and prompts ride along."""
    log = tempfile.TemporaryFile()
    w = spawn("--log-level", "debug", stderr=log, env=worker_env(MLX_WORKER_FAULTS="selfcheck@1"))
    try:
        w.load(tiny_model, model_id="tiny")
        assert "self-check ran out of memory" in log_text(log)
        alone = [run(w, p) for p in rows("tiny") + [long_prompt("tiny")]]
        together = decoding_then_prompt(w, "tiny")
        assert log_text(log).count("mixed pass:") >= 3, "a transient failure turned packing off for good"
        for i, (a, b) in enumerate(zip(alone, together)):
            same(a, b, i)
    finally:
        w.close()
        log.close()

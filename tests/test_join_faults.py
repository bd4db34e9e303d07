"""A request whose join into a running batch fails (MLX_WORKER_FAULTS="join@n",
mlx_worker/faults.py: an allocation failure where its catch-up or first step
would run) ends alone with -32005; the requests already decoding go on
exactly as solo and the worker keeps serving (a later join works).
Speculative pair: spec-target / spec-draft (test_draft_batch.py); vision:
tiny-qwen2-vl (test_vision_batch.py)."""

from __future__ import annotations

import tempfile

import pytest

from conftest import spawn, worker_env
from fixtures.build import ensure_model
from mlx_worker import protocol
from mlx_worker.client import RpcError
from test_draft_batch import assert_equal_runs, batches, params
from vision_images import b64, gradient, noise, png, user


def decoding(stream, n: int = 4) -> None:
    """Read a stream until its n-th token: it is decoding now."""
    for _ in zip(range(n), (e for e in stream if isinstance(e, protocol.TokenEvent))):
        pass


def failed_join(stream) -> RpcError:
    with pytest.raises(RpcError) as e:
        stream.wait()
    err = e.value
    assert err.code == -32005 and "injected allocation failure in join" in err.message, err
    assert err.data["tokens"] == [] and err.data["text"] == ""
    return err


def test_a_speculative_join_that_fails_ends_that_request_only():
    log = tempfile.TemporaryFile()
    w = spawn("--log-level", "info", stderr=log, env=worker_env(MLX_WORKER_FAULTS="join@1,join@3"))
    w.log = log
    try:
        w.load(str(ensure_model("spec-draft")), model_id="draft")
        w.load(str(ensure_model("spec-target")), model_id="target")
        first, second = params(0, max_tokens=160), params(1, max_tokens=80)
        solo = []
        for p in (first, second):  # one at a time: no join
            s = w.generate(**p)
            solo.append((s.wait(), s.events))
        batches(w)
        a = w.generate(**first)
        decoding(a)
        b = w.generate(**second)  # a is a lone speculative request: b's join (a batch of both) fails
        failed_join(b)
        assert_equal_runs(solo[:1], [(a.wait(), a.events)])
        assert all(str(b.id) not in rows for rows in batches(w))
        assert w.status().memory.requests == []
        # The worker keeps serving: two of the pair batch again, and a third
        # whose join into their batch fails leaves both as they were.
        a = w.generate(**first)
        decoding(a)
        b = w.generate(**second)
        decoding(b)
        c = w.generate(**params(2))
        failed_join(c)
        assert_equal_runs(solo, [(s.wait(), s.events) for s in (a, b)])
        seen = batches(w)
        assert {str(a.id), str(b.id)} in seen and all(str(c.id) not in rows for rows in seen), seen
        assert w.status().memory.requests == []
    finally:
        w.close()
        log.close()


def test_a_vision_row_whose_first_step_fails_ends_alone():
    """A vision row's first step runs as it joins the batch (engine/batch.py
    ``_join_primed``): its failure ends that request only."""
    w = spawn(env=worker_env(MLX_WORKER_FAULTS="join@2"))
    try:
        w.load(str(ensure_model("tiny-qwen2-vl")), model_id="v")
        base = {"model_id": "v", "ignore_eos": True, "prompt_cache": False, "temperature": 0}
        first = {**base, "max_tokens": 120,
                 "messages": user("What is in the picture?", ("image", b64(png(noise(3, (48, 40))))))}
        second = {**base, "max_tokens": 12,
                  "messages": user("And this one?", ("image", b64(png(gradient((40, 56))))))}
        a = w.generate(**first)  # join 1
        decoding(a)
        failed_join(w.generate(**second))  # join 2 fails
        a.wait()
        assert a.result.tokens == w.generate(**first).wait().tokens  # solo
        assert len(w.generate(**second).wait().tokens) == 12
        assert w.status().memory.requests == []
    finally:
        w.close()

"""Injected faults (mlx_worker/faults.py, MLX_WORKER_FAULTS): an allocation
failure in prefill, decode or a disk restore ends only the affected request
with -32005 (and the tokens it streamed); a full disk drops the entry being
written and nothing else; the store stays consistent after each."""

from __future__ import annotations

import pytest

from conftest import spawn, worker_env
from mlx_worker.client import RpcError
from test_cache_disk import conversation, next_turn


def tokens(n: int, salt: int) -> list[int]:
    return [7 + (i * 11 + salt) % 900 for i in range(n)]


def test_prefill_and_decode_failures_end_only_that_request(tiny_model):
    w = spawn(env=worker_env(MLX_WORKER_FAULTS="prefill@2,decode@5"))
    try:
        w.load(tiny_model, model_id="m")
        with pytest.raises(RpcError) as e:  # its 2nd prefill chunk fails
            w.generate(model_id="m", tokens=tokens(600, 1), max_tokens=4, prefill_step_size=256).wait()
        assert e.value.code == -32005 and e.value.data["tokens"] == []
        assert w.status().models[0].prompt_cache.entries == 0  # nothing half-stored
        # Two requests decode together; the 5th sample (whichever row) fails: that row only.
        params = [dict(model_id="m", tokens=tokens(40, s), max_tokens=12, ignore_eos=True, temperature=0)
                  for s in (2, 3)]
        streams = [w.generate(**p) for p in params]
        outcomes = []
        for s in streams:
            try:
                outcomes.append(s.wait())
            except RpcError as exc:
                outcomes.append(exc)
        failed = [o for o in outcomes if isinstance(o, RpcError)]
        assert len(failed) == 1 and failed[0].code == -32005
        for p, o in zip(params, outcomes):
            alone = w.generate(**{**p, "prompt_cache": False}).wait()
            if isinstance(o, RpcError):
                streamed = o.data["tokens"]
                assert streamed == alone.tokens[: len(streamed)]  # what it streamed, then the error
                assert o.data["text"] is not None
            else:
                assert o.tokens == alone.tokens
        assert w.status().memory.requests == []
        again = w.generate(model_id="m", tokens=tokens(600, 1), max_tokens=4, ignore_eos=True).wait()
        assert len(again.tokens) == 4
    finally:
        w.close()


def test_disk_faults_restore_and_full_disk(tiny_model, tmp_path):
    folder = tmp_path / "kv"
    w = spawn("--cache-dir", str(folder), env=worker_env(MLX_WORKER_FAULTS="spill@1,restore@1"))
    try:
        w.load(tiny_model, model_id="m", prompt_cache_entries=1)
        chats = [conversation(4 + i) for i in range(3)]
        outs = [w.generate(model_id="m", messages=c, max_tokens=4, temperature=0).wait() for c in chats]
        disk = w.status().disk_cache[0]
        # chats[0]'s entry hit the full disk: dropped; chats[1]'s was written
        assert disk.writes == 1 and disk.entries == 1
        assert w.status().models[0].prompt_cache.entries == 1
        turn = next_turn(chats[1], outs[1].text)
        with pytest.raises(RpcError) as e:  # the restore's allocation fails
            w.generate(model_id="m", messages=turn, max_tokens=6, temperature=0).wait()
        assert e.value.code == -32005
        assert w.status().models[0].prompt_cache.entries == 1  # RAM's entry is still there
        back = w.generate(model_id="m", messages=turn, max_tokens=6, temperature=0).wait()
        cold = w.generate(model_id="m", messages=turn, max_tokens=6, temperature=0, prompt_cache=False).wait()
        assert back.usage.cached_tokens >= outs[1].usage.prompt_tokens and back.tokens == cold.tokens
        lost = next_turn(chats[0], outs[0].text)  # its entry was dropped: still the right output
        redo = w.generate(model_id="m", messages=lost, max_tokens=6, temperature=0).wait()
        cold = w.generate(model_id="m", messages=lost, max_tokens=6, temperature=0, prompt_cache=False).wait()
        assert redo.usage.cached_tokens < redo.usage.prompt_tokens - 8 and redo.tokens == cold.tokens
    finally:
        w.close()

"""Preemption: when the running requests' KV outgrows a lowered memory limit,
the youngest is paused (its KV written to the disk tier's folder) and resumed
when it fits, with the tokens of an uninterrupted run."""

from __future__ import annotations

import time

from conftest import spawn
from mlx_worker.protocol import TokenEvent


def tokens(n: int, salt: int) -> list[int]:
    return [7 + (i * 11 + salt) % 900 for i in range(n)]


def test_the_youngest_is_paused_and_resumed_identically(tiny_model, tmp_path):
    w = spawn("--cache-dir", str(tmp_path / "kv"))
    try:
        w.load(tiny_model, model_id="m", prompt_cache_entries=0)
        params = [dict(model_id="m", tokens=tokens(300, s), max_tokens=400, ignore_eos=True, temperature=0)
                  for s in (1, 2)]
        alone = [w.generate(**p).wait().tokens for p in params]
        streams = [w.generate(**p) for p in params]
        seen = 0
        for event in streams[1]:  # both decode: lower the limit under their KV
            if isinstance(event, TokenEvent):
                seen += 1
                if seen == 5:
                    # no room left for their KV to grow to max_tokens
                    w.set_limits(memory_limit=w.status().memory.active)
                    break
        paused = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not paused:
            paused = list((tmp_path / "kv").glob(".paused-*"))
            time.sleep(0.05)
        assert paused, "the youngest request was not paused"
        results = [s.wait() for s in streams]  # the paused one resumes once the other is done
        assert [r.tokens for r in results] == alone
        assert not list((tmp_path / "kv").glob(".paused-*"))
    finally:
        w.close()

"""The memory estimate of requests running together: every request's
``memory_estimate`` is the worker's expected peak since it was last idle,
so it bounds the ``peak_memory`` it reports, whenever the second request
arrives (with the first: their prompts prefilled together; while the first
decodes: it prefills alone and joins the batch)."""

from __future__ import annotations

import pytest

from conftest import spawn
from mlx_worker import protocol


def tokens(n: int, salt: int) -> list[int]:
    return [7 + (i * 7 + salt) % 900 for i in range(n)]


def request(n: int, m: int) -> dict:
    return dict(model_id="m", tokens=tokens(n, n), max_tokens=m, ignore_eos=True, temperature=0,
                prompt_cache=False, prefill_step_size=512)


@pytest.mark.parametrize("when", ["together", "decoding"])
def test_each_estimate_bounds_the_batch_peak(tiny_model, when):
    w = spawn()
    try:
        w.load(tiny_model, model_id="m", prompt_cache_entries=0)
        w.generate(model_id="m", tokens=tokens(64, 0), max_tokens=2, prompt_cache=False).wait()
        first = w.generate(**request(1200, 200))
        events = iter(first)
        if when == "decoding":
            while not isinstance(next(events), protocol.TokenEvent):
                pass
        second = w.generate(**request(200, 400))
        seen = None
        for event in second:
            if seen is None and isinstance(event, protocol.TokenEvent):
                seen = w.status().memory.requests
        rb = second.result
        ra = first.wait()
    finally:
        w.close()
    for r in (ra, rb):
        assert r.peak_memory <= r.memory_estimate <= 1.3 * r.peak_memory, (when, r.memory_estimate, r.peak_memory)
    # Both report the worker's peak since idle, and so the same expected peak: the
    # first's estimate, made when it ran alone, was raised when the second was admitted.
    assert ra.memory_estimate == rb.memory_estimate
    if seen is not None and len(seen) == 2:  # both still running: status says the same
        assert seen[0].estimate == seen[1].estimate == rb.memory_estimate

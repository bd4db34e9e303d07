"""Rows that leave a decode batch are stored in the prompt cache holding
exactly what it counts.

A row's KV cut out of a batch's shared buffer (mlx-lm's ``BatchKVCache.extract``)
is a lazy copy: until evaluated it holds the whole buffer, every row's KV at
that step, while the prompt cache counts only the row's bytes. Measured before
the fix: 16 batched rows stored, the worker's active memory grew ~3 x what
the prompt cache counted (it never shrank: nobody evaluated them).
"""

from __future__ import annotations

from conftest import spawn


def test_rows_stored_from_a_batch_hold_what_the_prompt_cache_counts(tiny_model):
    w = spawn()
    try:
        w.load(tiny_model, model_id="m")
        base = w.status().memory
        for r in range(2):
            streams = [w.generate(model_id="m", prompt=f"{r}.{i} sea ship wind wave " * 3, max_tokens=60,
                                  temperature=0, ignore_eos=True) for i in range(8)]
            for s in streams:
                assert s.wait().stop_reason == "max_tokens"
        m = w.status().memory
        assert m.pools.prompt_cache_entries - base.pools.prompt_cache_entries == 16
        counted = m.pools.prompt_cache - base.pools.prompt_cache
        grew = m.active - base.active
        assert grew <= 1.1 * counted + (1 << 20), (grew, counted)
    finally:
        w.close()

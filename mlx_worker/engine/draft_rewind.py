"""The KV of speculative rows that decode together: each row's caches set to
where a round starts, and rewound per row after the verify (rows keep
different numbers of drafts). Used by draft_batch.py.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, dynamic_roll, trim_prompt_cache

from ..cache import store as prompt_cache
from . import runner

CATCH_UP_STEP = 512  # tokens per draft call when its cache catches up


def plain_kv(cache: list) -> bool:
    """Only plain KV merges into a batch (a window, recurrent state or
    quantized KV keeps its request in a group of its own)."""
    return bool(cache) and all(type(c) is KVCache for c in cache)


def sequence(gen) -> list[int]:
    """Every token a request's caches stand for: its prompt, then what it sampled."""
    return list(gen.plan.prompt.tokens) + list(gen.decoder.sampled)


def set_to(half: list, model, tokens: list[int], n: int) -> None:
    """One model's caches to hold exactly ``tokens[:n]``: trimmed when
    ahead, fed what they skipped when behind (a draft that paused)."""
    have = prompt_cache.cache_offset(half)
    if have > n:
        trim_prompt_cache(half, have - n)
    for i in range(have, n, CATCH_UP_STEP):
        runner.forward(model, mx.array(tokens[i : min(i + CATCH_UP_STEP, n)], mx.uint32), half)
        mx.eval([c.state for c in half])


def rewind(layers: list, back: list[int]) -> None:
    """Take back ``back[i]`` positions of row i from every layer. One shared
    write index: all rows are trimmed by the smallest amount, then each other
    row's content is rolled right by its extra amount and its left padding
    grown by as much (as ``BatchKVCache.finalize`` does with right padding),
    so the rejected positions become masked padding."""
    if not isinstance(layers[0], BatchKVCache):  # one row: plain caches
        if back[0]:
            trim_prompt_cache(layers, back[0])
        return
    low = min(back)
    moved = [i for i, b in enumerate(back) if b > low]  # only these rows' content moves
    if moved:
        rows = mx.array(moved)
        shift = mx.array([back[i] - low for i in moved])
        grow = mx.zeros((len(back),), mx.int32).at[rows].add(shift.astype(mx.int32))
    for c in layers:
        if low:
            c.trim(low)
        if not moved or c.keys is None:
            continue
        end = c._idx
        for name in ("keys", "values"):
            buf = getattr(c, name)
            buf[rows, :, :end] = dynamic_roll(buf[rows, :, :end], shift[:, None], axis=2)
        c.left_padding = c.left_padding + grow
        c.offset = c.offset - grow


def own_end(gen, draft, cache: list) -> list:
    """A row's own caches when it leaves (as ``SpeculativeGroup._end``): both
    halves cut to the tokens emitted, all but the last sampled one; when the
    cache is kept, the draft half first reads what it lacks."""
    n = draft.n_target
    keep = gen.plan.n_prompt - 1 + len(gen.decoder.sampled)
    halves = (cache[:n], cache[n:])
    if gen.lease is not None:
        set_to(halves[1], draft.lm.model, sequence(gen), min(keep, prompt_cache.cache_offset(halves[0])))
        keep = min([keep] + [prompt_cache.cache_offset(h) for h in halves])
    for half in halves:
        off = prompt_cache.cache_offset(half)
        if off > keep:
            trim_prompt_cache(half, off - keep)
    mx.eval([c.state for c in cache])
    return cache

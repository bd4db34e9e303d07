"""Admission counts the decode batch's padding: mlx-lm's BatchKVCache
left-pads every row to the longest, so a long prompt joining three short
rows makes the batch hold 4 x (1,500 + 600) tokens of KV where the rows'
own caches are ~3,800 (the padding is ~3.5 x the long row's own KV).

Under a model's ``memory_limit`` with room for every row's own need but
not for that padding, the long request waits until the short ones end;
with room for the padding it joins them while they decode. (Before the
padding counted under a model's limit, it joined in both cases.) That is
the BatchKVCache layout (``MLX_WORKER_PACKED=0``); on the default ragged
layout (engine/layouts.py) the long row keeps its own cache and pads
nothing, so it joins under the first limit already.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from conftest import spawn, worker_env

SHORT = {"max_tokens": 600, "ignore_eos": True, "temperature": 0, "prompt_cache": False}
LONG = {"max_tokens": 8, "ignore_eos": True, "temperature": 0, "prompt_cache": False, "prefill_step_size": 512}


def short(i: int) -> dict:
    return {**SHORT, "tokens": [11 + i, 20, 30, 40, 50, 60, 70, 80, 90, 100]}


def long_req() -> dict:
    return {**LONG, "tokens": [7 + (i * 13) % 900 for i in range(1500)]}


def probe(w, tiny_model, req: dict) -> dict:
    """The -32005 data of ``req`` under a limit that admits nothing: its need."""
    weights = sum(f.stat().st_size for f in Path(tiny_model).glob("*.safetensors"))
    w.load(tiny_model, model_id="probe", memory_limit=weights + 4096, prompt_cache_entries=0)
    with pytest.raises(Exception) as exc:
        w.generate(model_id="probe", **req).wait()
    w.unload("probe")
    assert exc.value.code == -32005, exc.value
    return exc.value.data


def long_joins_the_decoding_rows(w, tiny_model, limit: int) -> bool:
    """Three short rows decode; the long one arrives once they do: True when
    its first token comes before they end (it was admitted beside them)."""
    w.load(tiny_model, model_id="m", memory_limit=limit, prompt_cache_entries=0)
    try:
        shorts = [w.generate(model_id="m", **short(i)) for i in range(3)]
        events = iter(shorts[0])
        next(events)  # the first short row is decoding
        late = w.generate(model_id="m", **long_req())
        waits = [threading.Thread(target=s.wait) for s in shorts]
        for t in waits:
            t.start()
        result = late.wait()
        for t in waits:
            t.join(timeout=300)
        assert len(result.tokens) == 8 and all(len(s.result.tokens) == 600 for s in shorts)
        lines = [json.loads(line) for line in w.lines]
        first = next(i for i, m in enumerate(lines) if m.get("method") == "token" and m["params"]["id"] == late.id)
        ends = [next(i for i, m in enumerate(lines) if m.get("id") == s.id and "result" in m) for s in shorts]
        return first < min(ends)
    finally:
        w.unload("m")


def limits(w, tiny_model) -> tuple[int, int]:
    """(every row's own need plus one long row's KV of slack: well short of
    the padding; the same with room for the padding)."""
    s, lg = probe(w, tiny_model, short(0)), probe(w, tiny_model, long_req())
    weights = sum(f.stat().st_size for f in Path(tiny_model).glob("*.safetensors"))
    own = weights + 3 * s["needed"] + lg["needed"] + lg["kv_cache"]
    return own, own + 6 * lg["kv_cache"]


def test_a_long_row_joining_short_ones_is_admitted_by_the_padded_figure(tiny_model):
    w = spawn(env=worker_env(MLX_WORKER_PACKED="0"))
    try:
        own, padded = limits(w, tiny_model)
        assert not long_joins_the_decoding_rows(w, tiny_model, own), "joined although the padding does not fit"
        assert long_joins_the_decoding_rows(w, tiny_model, padded), "waited with room for the padding"
    finally:
        w.close()


def test_a_ragged_batch_counts_no_padding(tiny_model):
    w = spawn()
    try:
        own, _ = limits(w, tiny_model)
        assert long_joins_the_decoding_rows(w, tiny_model, own), "waited for padding a ragged batch doesn't have"
    finally:
        w.close()

"""Memory: figures for `status`, the memory limits, and admission checks.

MLX's own limit (``mx.set_memory_limit``) is a guideline for its allocator,
not a guard: on Metal it makes allocations wait for in-flight work and
reuse the buffer cache before growing; on CPU it changes nothing, and an
allocation the machine cannot satisfy crashes the process (or the kernel's
OOM killer ends it). So the worker estimates what a load or a generation
needs *before* starting it, and refuses with -32005 what would not fit:

- the worker-wide limit: ``--memory-limit``, else MLX's default limit
  (about 80 % of RAM on CPU; 1.5 × the recommended working set on Metal);
- a model's own limit: ``load``'s ``memory_limit`` bounds that model's
  weights plus what any one of its requests needs.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from . import errors, protocol
from .errors import WorkerError
from .model_checks import text_config

_worker_limit: Optional[int] = None  # --memory-limit

KV_STEP = 256  # mlx-lm's KVCache grows in steps of this many tokens
MiB = 1 << 20


def set_worker_limit(limit: Optional[int]) -> None:
    """``--memory-limit``: the admission limit, and MLX's allocator limit."""
    global _worker_limit
    import mlx.core as mx

    _worker_limit = limit or None
    if _worker_limit:
        mx.set_memory_limit(_worker_limit)


def worker_limit() -> int:
    import mlx.core as mx

    return _worker_limit or mx.get_memory_limit()


def rss_bytes() -> int:
    """Resident set size now (not the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:  # macOS: ru_maxrss is the peak, in bytes; the best cheap figure there
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except Exception:
        return 0


def memory_status() -> protocol.MemoryStatus:
    import mlx.core as mx

    return protocol.MemoryStatus(
        active=mx.get_active_memory(),
        peak=mx.get_peak_memory(),
        cache=mx.get_cache_memory(),
        rss=rss_bytes(),
        limit=worker_limit(),
    )


# ------------------------------------------------------------------ estimates


def _positive_int(cfg: dict, *keys: str) -> Optional[int]:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _float_itemsize(model: Any) -> int:
    """Bytes per element of the model's activations (its float weights' dtype)."""
    try:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        for _, p in tree_flatten(model.parameters()):
            if isinstance(p, mx.array) and mx.issubdtype(p.dtype, mx.floating):
                return p.dtype.size
    except Exception:
        pass
    return 4


def generate_need(lm, n_prompt: int, max_tokens: int, prefill_step: int) -> tuple[int, dict]:
    """Bytes a generation needs beyond what is already allocated: the KV
    cache for prompt + max_tokens, plus the largest prefill chunk's
    activations. An estimate from config.json, on the generous side."""
    import mlx.core as mx

    cfg = text_config(lm.config)
    layers = _positive_int(cfg, "num_hidden_layers", "n_layer", "num_layers") or 0
    hidden = _positive_int(cfg, "hidden_size", "n_embd", "d_model") or 0
    heads = _positive_int(cfg, "num_attention_heads", "n_head") or 1
    kv_heads = _positive_int(cfg, "num_key_value_heads") or heads
    head_dim = _positive_int(cfg, "head_dim") or (hidden // heads if hidden else 0)
    inter = _positive_int(cfg, "intermediate_size", "n_inner") or 4 * hidden
    itemsize = lm.extra.get("itemsize") or _float_itemsize(lm.model)
    lm.extra["itemsize"] = itemsize

    total = n_prompt + max_tokens
    kv_tokens = min(total, lm.max_kv_size) if lm.max_kv_size else total
    kv_tokens = math.ceil(kv_tokens / KV_STEP) * KV_STEP
    # A quantized cache (kv_bits) holds packed bits plus a scale and a bias per group.
    quant = getattr(lm, "kv_quant", None)
    element = quant.element_bytes(itemsize) if quant is not None else itemsize
    kv = int(2 * layers * kv_heads * head_dim * element * kv_tokens)

    growth = kv // layers if layers else 0  # a layer's cache is copied as it grows
    # A windowed cache (max_kv_size, sliding-window layers) keeps a snapshot
    # of its state during prompt processing for the prompt cache
    # (prompt_cache.Lease.progress): a second copy of up to a window of KV.
    window = lm.max_kv_size or _positive_int(cfg, "sliding_window")
    snapshot = 2 * layers * kv_heads * head_dim * itemsize * min(kv_tokens, window) if window else 0
    # A model's own windows and recurrent layers keep checkpoints instead
    # (checkpoints.py): a few per request, sized by the largest its store
    # has seen (recurrent state has no size in config.json).
    if not lm.max_kv_size:
        from .checkpoints import PER_REQUEST

        measured = getattr(getattr(lm, "prompt_cache", None), "checkpoint_nbytes", 0) or 0
        snapshot = max(snapshot, measured) * PER_REQUEST

    chunk = max(1, min(prefill_step, n_prompt))
    # One layer's temporaries at a time (MLX frees buffers as soon as their
    # last consumer ran): hidden states and projections, the MLP, and on CPU
    # the attention scores and mask, which the GPU backends' fused attention
    # never materializes. Fitted to peaks measured on CPU (within ~10 %).
    acts = chunk * (8 * hidden + 4 * inter) * itemsize
    if mx.default_device().type != mx.DeviceType.gpu:
        acts += (heads + 1) * chunk * min(total, kv_tokens) * 4
    logits = 4 * lm.vocab_size * 4  # fp32 logits, log-probs, sampling copies
    need = int((kv + growth + snapshot + acts + logits) * 1.1)
    parts = {"kv_cache": kv, "activations": acts, "kv_tokens": kv_tokens}
    if snapshot:
        parts["snapshot"] = snapshot
    return need, parts


def admit_generate(lm, n_prompt: int, max_tokens: int, prefill_step: int) -> None:
    """Raise -32005 when the generation would not fit a memory limit."""
    import mlx.core as mx

    need, parts = generate_need(lm, n_prompt, max_tokens, prefill_step)
    model_limit = getattr(lm, "memory_limit", None)
    if model_limit and lm.memory_bytes + need > model_limit:
        raise refusal("generate", need, model_limit - lm.memory_bytes, model_limit, "model", parts)
    limit = worker_limit()
    available = limit - mx.get_active_memory()
    if need > available:
        raise refusal("generate", need, available, limit, "worker", parts)


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors") if f.is_file())


def admit_load(path: Path, model_limit: Optional[int]) -> None:
    """Raise -32005 when a model's weights would not fit a memory limit."""
    import mlx.core as mx

    need = weights_bytes(path)
    if model_limit and need > model_limit:
        raise refusal("load", need, model_limit, model_limit, "model", {"weights": need})
    limit = worker_limit()
    available = limit - mx.get_active_memory()
    if need > available:
        raise refusal("load", need, available, limit, "worker", {"weights": need})


def refusal(what: str, need: int, available: int, limit: int, which: str, parts: dict) -> WorkerError:
    name = "the model's memory_limit" if which == "model" else "the worker's memory limit"
    hint = (
        " (fewer max_tokens, a shorter prompt, a smaller prefill_step_size or max_kv_size would need less)"
        if what == "generate"
        else ""
    )
    return WorkerError(
        errors.OUT_OF_MEMORY,
        f"{what} needs about {need / MiB:.1f} MiB but only {max(0, available) / MiB:.1f} MiB are left "
        f"under {name} ({limit / MiB:.1f} MiB){hint}",
        {"needed": need, "available": max(0, available), "limit": limit, "limit_kind": which, **parts},
    )

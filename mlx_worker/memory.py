"""Memory: figures for `status`, the memory limits, and admission checks.

MLX's own limit guides its allocator but guards nothing on CPU, so the
worker estimates what a load or a generation needs *before* starting it and
refuses with -32005 what would not fit the worker-wide limit
(``--memory-limit``, else MLX's default) or a model's own ``memory_limit``.
Spec: protocol/README.md § Memory limits.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Optional

from . import errors, protocol
from .errors import WorkerError

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
    from .cache.budget import budget

    budget().over_limit = lambda: mx.get_active_memory() - worker_limit()


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


# Running requests' admission figures, for `status` (read on the reader thread).
_requests: dict = {}
_requests_lock = threading.Lock()
# The largest estimate since MLX's peak was last reset: a request reports the
# worker's peak since then, so that is the figure it can expect.
_expected = 0


def reset_peak() -> None:
    """The worker is idle and a request starts: MLX's peak counts from here."""
    global _expected
    import mlx.core as mx

    mx.reset_peak_memory()
    with _requests_lock:
        _expected = 0


def track(request_id, model_id: str, estimate: int, need: int) -> int:
    """A request admitted with an expected peak of ``estimate`` bytes
    (``need`` of them its own). Returns the worker's expected peak since
    ``reset_peak``, which every running request's estimate is raised to
    (one that joins later can raise the peak the earlier ones report)."""
    global _expected
    with _requests_lock:
        _expected = max(_expected, estimate)
        for key, (rid, mid, e, n) in list(_requests.items()):
            _requests[key] = (rid, mid, max(e, _expected), n)
        _requests[_key(request_id)] = (request_id, model_id, _expected, max(0, need))
        return _expected


def untrack(request_id) -> None:
    with _requests_lock:
        _requests.pop(_key(request_id), None)


def _key(request_id):
    return (type(request_id).__name__, request_id)


_buffer_cache_limit: Optional[int] = None  # set_limits' buffer_cache_bytes
_wired_limit: Optional[int] = None


def pools(models: list) -> protocol.MemoryPools:
    import mlx.core as mx

    from .cache.budget import budget

    b = budget()
    with _requests_lock:
        requests = sum(n for _, _, _, n in _requests.values())
    return protocol.MemoryPools(
        weights=sum(m.memory_bytes for m in models),
        requests=requests,
        prompt_cache=b.bytes(),
        prompt_cache_entries=b.entries(),
        prompt_cache_limit=b.max_bytes,
        prompt_cache_hits=b.hits,
        buffer_cache=mx.get_cache_memory(),
        buffer_cache_limit=_buffer_cache_limit,
        wired_limit=_wired_limit,
    )


def set_limits(params: protocol.SetLimitsParams, models: list) -> protocol.SetLimitsResult:
    """``set_limits``: each given limit takes effect now (the next admission
    sees it); a smaller prompt-cache budget evicts oldest-first at once."""
    global _buffer_cache_limit, _wired_limit
    import mlx.core as mx

    from .cache import budget as cache_budget

    evicted = 0
    applied = False
    if params.wired_limit is not None:
        if mx.metal.is_available():
            # Policy (spec, "Memory limits"): never above the device's
            # recommended working set; wiring keeps the models' pages resident.
            cap = mx.device_info().get("max_recommended_working_set_size") or params.wired_limit
            mx.set_wired_limit(min(params.wired_limit, int(cap)))
            _wired_limit, applied = min(params.wired_limit, int(cap)), True
    if params.memory_limit is not None:
        set_worker_limit(params.memory_limit)
        evicted += cache_budget.budget().enforce()  # entries go first when the limit shrinks
    if params.buffer_cache_bytes is not None:
        mx.set_cache_limit(params.buffer_cache_bytes)
        _buffer_cache_limit = params.buffer_cache_bytes
    if params.prompt_cache_bytes is not None:
        evicted = cache_budget.set_max_bytes(params.prompt_cache_bytes)
        if evicted:
            mx.clear_cache()
    return protocol.SetLimitsResult(limit=worker_limit(), pools=pools(models), evicted_bytes=evicted,
                                    wired_limit_applied=applied)


def memory_status(models: Optional[list] = None) -> protocol.MemoryStatus:
    import mlx.core as mx

    peak = mx.get_peak_memory()
    with _requests_lock:
        running = list(_requests.values())
    return protocol.MemoryStatus(
        active=mx.get_active_memory(),
        peak=peak,
        cache=mx.get_cache_memory(),
        rss=rss_bytes(),
        limit=worker_limit(),
        requests=[protocol.RequestMemory(id=r, model_id=m, estimate=e, need=n, peak=peak) for r, m, e, n in running],
        pools=pools(models or []),
    )


# ------------------------------------------------------------------ estimates


def generate_need(lm, n_prompt: int, max_tokens: int, prefill_step: int) -> tuple[int, dict]:
    """Bytes a generation needs beyond what is already allocated
    (memory_model.py), plus the prompt cache's copies of untrimmable state
    (a max_kv_size snapshot, or checkpoints)."""
    from . import memory_model

    need, parts = memory_model.generate_need(lm, n_prompt, max_tokens, prefill_step)
    store = getattr(lm, "prompt_cache", None)
    if store is None:
        return need, parts
    lay = memory_model.layout(lm)
    windows = [layer[1] for layer in lay.layers if layer[0] == "window"]
    if lm.max_kv_size:
        # prompt_cache.Lease.progress keeps a copy of the state at the last
        # reusable chunk boundary: a second copy of the cache as it was then.
        snapshot = memory_model.cache_bytes(lay, max(0, n_prompt - 1), prefill_step, False) if windows else 0
    else:
        # A model's own windows and recurrent layers keep checkpoints while
        # the request runs (checkpoints.py): copies of those layers only, a
        # few per request, at least the size its store has seen.
        from .cache.checkpoints import PER_REQUEST

        kv = lay.kv_token_bytes(lay.itemsize)
        one = sum(kv * min(size + prefill_step - 1, n_prompt) for size in windows)
        one += sum(layer[1] for layer in lay.layers if layer[0] == "state")
        snapshot = int(max(one, getattr(store, "checkpoint_nbytes", 0) or 0)) * PER_REQUEST
    if snapshot:
        parts["snapshot"] = snapshot
        need += snapshot
    return need, parts


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

"""Admission: does a request's memory fit beside the admitted ones?

A request is admitted when the KV it may need (memory.py's estimate, less
what its prompt-cache lease reuses) fits beside what the admitted requests
may still need. If it doesn't: least recently used prompt-cache entries are
evicted (every store the cache budget knows); then it waits while other
requests run; with nothing running it is refused with -32005. Spec: "Memory limits".
"""

from __future__ import annotations

import logging
import mlx.core as mx

from .. import memory, memory_model
from ..cache.budget import budget
from . import layouts
from .prefill_turns import MAX_PREFILL_ROWS
from .request import Request

log = logging.getLogger("mlx_worker.engine.admission")


class Admission:
    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.beside = scheduler.beside

    def never_fits(self, gen: Request) -> None:
        """Refuse (-32005) a request over its model's memory_limit even alone."""
        need = max(0, gen.need - gen.reused_bytes)
        lm = gen.lm
        model_limit = getattr(lm, "memory_limit", None)
        if model_limit and lm.memory_bytes + need > model_limit:
            raise memory.refusal("generate", need, model_limit - lm.memory_bytes, model_limit, "model",
                                 gen.need_parts)

    def fits(self, gen: Request) -> bool:
        """Whether ``gen`` fits now (after evicting prompt-cache entries);
        raises the -32005 refusal when it never will (nothing to wait for)."""
        self.never_fits(gen)
        need = max(0, gen.need - gen.reused_bytes)
        lm = gen.lm
        own = [g for g in self.scheduler.running() if g is not gen]
        others = own + (self.beside.running() if self.beside else [])
        # a batch of this model's rows holds rows x longest (left-padded), not their sum
        model_out = sum(g.need for g in others if g.lm is lm) + self._padding(gen, others)[0]
        limit = memory.worker_limit()
        model_limit = getattr(lm, "memory_limit", None)
        for attempt in range(2):
            estimate = self.estimate(gen)
            # the model's own limit holds its weights, its prompt-cache entries, its requests and their batch's padding
            model_over = (lm.memory_bytes + _model_store_bytes(lm) + model_out + need - model_limit
                          if model_limit else 0)
            if estimate <= limit and model_over <= 0:
                return True
            if attempt == 0 and (self._evict(gen, estimate - limit) if estimate > limit
                                 else _evict_model(lm, model_over)):
                continue
            break
        if own:
            return False  # wait: running requests will free memory
        # (beside paused requests it can't wait: they don't run meanwhile)
        available = limit - (estimate - need)
        raise memory.refusal("generate", need, available, limit, "worker", gen.need_parts)

    def track(self, gen: Request) -> None:
        """``gen`` is admitted: its expected peak, recorded for ``status``;
        every running request reports the worker's expected peak since idle."""
        estimate = self.estimate(gen)
        if gen.memory_base is not None:  # arrived idle: memory before its own work (vision tower, lease)
            estimate = max(estimate, gen.memory_base + max(0, gen.need - gen.reused_bytes))
        gen.memory_estimate = memory.track(gen.request_id, gen.lm.model_id, estimate, gen.need - gen.reused_bytes)
        for other in self.scheduler.running() + (self.beside.running() if self.beside else []):
            other.memory_estimate = max(other.memory_estimate or 0, gen.memory_estimate)

    def estimate(self, gen: Request) -> int:
        """The peak expected with ``gen`` running beside the admitted
        requests: what is resident (active memory less what the running
        requests' caches hold now), every request's KV up to its
        max_tokens, a batch's padding, and the largest one's temporaries
        (prefill chunks run one at a time) — or, where prompts will share
        prefill chunks, those chunks beside the others' KV."""
        others = [g for g in self.scheduler.running() if g is not gen]
        if self.beside:
            others += self.beside.running()
        resident = mx.get_active_memory() - self.held() - (self.beside.admission.held() if self.beside else 0)
        gens = others + [gen]
        kv = sum(g.need_parts.get("kv_cache", 0) for g in gens)
        temporaries = max(memory_model.temporaries(g.need, g.need_parts, g.cache is None or g.to_prefill <= 0)
                          for g in gens)
        padding, merge = self._padding(gen, others)
        peak = max(kv + padding + max(temporaries, merge), self._co_prefill(gen, gens))
        return max(0, resident) + peak - gen.reused_bytes

    def _co_prefill(self, gen: Request, gens: list[Request]) -> int:
        """Prompts of one model prefill together (prefill_turns.py) while
        shallow: their shared chunks, played out from where each prompt is
        now, beside the others' KV (0 when ``gen`` prefills alone)."""
        together = [g for g in gens if g.lm is gen.lm and g.cache is not None and g.to_prefill > 0
                    and g.text_batchable and g.plan.step_size == gen.plan.step_size][:MAX_PREFILL_ROWS]
        if gen not in together or len(together) < 2:
            return 0
        rest = [g for g in gens if g not in together]
        rows = [(g.processed, g.n_prompt, g.max_tokens, g.need_parts.get("kv_cache", 0)) for g in together]
        batch = [(g.n_prompt, g.max_tokens) for g in rest if g.lm is gen.lm and self._batchable(g)]
        return (sum(g.need_parts.get("kv_cache", 0) for g in rest)
                + memory_model.co_prefill(gen.lm, rows, gen.plan.step_size, batch))

    def held(self) -> int:
        """Bytes the running requests' caches hold now (between steps)."""
        s = self.scheduler
        total = 0
        for g in s.prefilling:
            total += _nbytes(g.cache)
        for group in s.decode.all():
            total += _nbytes(group.cache)
        return total

    def kv_estimate(self, also: Request | None = None) -> int:
        """Resident memory + the running requests' KV to their max_tokens
        (no temporaries: what must fit for them all to finish)."""
        gens = self.scheduler.running() + ([also] if also is not None else [])
        resident = mx.get_active_memory() - self.held()
        return max(0, resident) + sum(g.need_parts.get("kv_cache", 0) for g in gens)

    def _batchable(self, g: Request) -> bool:
        if g.cache is None:  # in a decode group, which owns its KV
            return self.scheduler.decode.in_batch(g)
        return g.batchable

    def _padding(self, gen: Request, others: list) -> tuple[int, int]:
        if not gen.batchable or layouts.ragged(gen.lm.model):
            return 0, 0  # a ragged batch pads nothing and merges nothing
        rows = [(g.n_prompt, g.max_tokens) for g in others + [gen] if g.lm is gen.lm and self._batchable(g)]
        return memory_model.padded(gen.lm, rows)

    def _evict(self, gen: Request, nbytes: int) -> bool:
        """Evict oldest-first across the stores (cache/budget.py): first from
        those no admitted request uses (other models', idle draft pairs'),
        then from all."""
        s = self.scheduler
        busy = {id(st) for st in _stores([gen] + s.running() + (self.beside.running() if self.beside else []))}
        idle = [st for st in budget().stores() if id(st) not in busy]
        freed = budget().evict(nbytes, first=idle)
        if freed:
            mx.clear_cache()
            log.info("prompt cache: evicted %d bytes to admit a request", freed)
        return freed > 0


def _stores(gens: list[Request]):
    seen = set()
    for g in gens:
        draft = g.plan.draft if g.plan is not None else None
        for store in (g.lm.prompt_cache, draft.store if draft is not None else None):
            if store is not None and id(store) not in seen:
                seen.add(id(store))
                yield store


def _model_stores(lm) -> list:
    from .draft_pairs import pair_stores

    return [s for s in [lm.prompt_cache, *pair_stores(lm)] if s is not None]


def _model_store_bytes(lm) -> int:
    return sum(s.status().bytes for s in _model_stores(lm))


def _evict_model(lm, nbytes: int) -> bool:
    freed = 0
    for store in _model_stores(lm):
        if freed >= nbytes:
            break
        freed += store.evict_lru(nbytes - freed)
    if freed:
        mx.clear_cache()
    return freed > 0


def _nbytes(cache) -> int:
    if not cache:
        return 0
    from ..cache.store import cache_nbytes

    try:
        return cache_nbytes(cache)
    except Exception:
        return 0

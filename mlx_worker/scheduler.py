"""The scheduler: every running generation, stepped together.

Each call to ``step`` does at most one prefill chunk (of the request whose
turn it is: prompts take turns chunk by chunk) and then one decode step of
every decode group (one batch per model, plus a group per request that can't
be merged). So a new prompt stalls the running streams for at most one
chunk, and a short request behind a long prompt starts after a chunk or two.
While streams are decoding, chunks are sized (from measured times) to take
about two decode steps, to keep a stream's gap between tokens near three idle
gaps (a long prompt joining the batch still costs more: BatchKVCache pads and
copies every row to its length); alone, a prompt is processed in its own
``prefill_step_size`` chunks, exactly as mlx-lm would.

Admission: a request is admitted when the KV it may need (memory.py's
estimate, less what its prompt-cache lease reuses) fits beside what the
admitted requests may still need. If it doesn't: least recently used prompt
cache entries are evicted; then it waits while other requests run (they
will free memory); with nothing running it is refused with -32005.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable, Iterable

import mlx.core as mx

from . import errors, memory, memory_model
from . import paused as paused_kv
from .batch import DecodeGroup, prefill_together
from .errors import WorkerError
from .generation import Generation

log = logging.getLogger("mlx_worker.scheduler")

MIN_CHUNK = 16
MAX_PREFILL_ROWS = 16  # prompts prefilled together in one forward pass
CHUNK_TIME_IN_STEPS = 2.0  # a chunk during decoding takes about this many decode steps

# (generation, outcome) -> None: a GenerateResult or the exception it ended with.
Done = Callable[[Generation, object], None]


class Scheduler:
    def __init__(self, done: Done, all_stores: Callable[[], Iterable] = tuple,
                 beside: "Scheduler | None" = None):
        def finished(gen: Generation, outcome: object) -> None:
            memory.untrack(gen.request_id)
            done(gen, outcome)

        self.done = finished
        self.all_stores = all_stores  # every loaded model's prompt-cache stores, pair stores too
        # run_alone: the main scheduler, whose requests are paused meanwhile
        # but still hold (and may still need) their memory.
        self.beside = beside
        self.waiting: collections.deque[Generation] = collections.deque()  # not admitted yet
        self.prefilling: collections.deque[Generation] = collections.deque()
        self.groups: dict[int, DecodeGroup] = {}  # id(model) -> its batch
        self.solo: list[DecodeGroup] = []
        self._step_s = 0.0  # decode step time (moving average)
        self._chunk = 64
        self._in_hand: list[Generation] = []
        # Preempted (paused.py): (generation, its KV on disk, batchable), oldest first.
        self.paused: list[tuple[Generation, object, bool]] = []
        self._admissions = 0

    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.solo or any(self.groups.values()) or self.paused)

    def decoding(self) -> int:
        return sum(len(g) for g in self.groups.values()) + len(self.solo)

    def running(self) -> list[Generation]:
        out = list(self.prefilling)
        for g in list(self.groups.values()) + self.solo:
            out.extend(g.rows)
        return out

    # ------------------------------------------------------------- submit

    def submit(self, gen: Generation) -> None:
        """Prepare and admit a new request (or answer it: error, cancelled)."""
        if not self.busy() and not (self.beside and self.beside.busy()):
            memory.reset_peak()  # never mid-batch: the running requests report the peak
        gen.memory_base = mx.get_active_memory()
        try:
            gen.prepare()
            gen.open()
        except BaseException as exc:
            self._fail(gen, _memory_error(exc, gen))
            return
        self._admit_or_wait(gen, first=True)

    def _admit_or_wait(self, gen: Generation, first: bool) -> bool:
        try:
            if first and self.waiting:
                # Requests start in arrival order: behind the ones already
                # waiting for memory (a stream of small requests must not
                # starve a big one), unless it can never fit at all.
                self._never_fits(gen)
                self._wait(gen)
                return False
            fits = self._fits(gen)
        except WorkerError as exc:
            self._fail(gen, exc)
            return True
        if fits:
            self._start(gen)
            return True
        if first:
            log.info("request waits for memory: %d bytes", gen.need)
            self._wait(gen)
        return False

    def _wait(self, gen: Generation) -> None:
        self.waiting.append(gen)
        gen.memory_base = None  # measured again when admitted
        _mark_waiting(gen, True)

    def _never_fits(self, gen: Generation) -> None:
        """Refuse (-32005) a request over its model's memory_limit even alone."""
        need = max(0, gen.need - gen.reused_bytes)
        lm = gen.lm
        model_limit = getattr(lm, "memory_limit", None)
        if model_limit and lm.memory_bytes + need > model_limit:
            raise memory.refusal("generate", need, model_limit - lm.memory_bytes, model_limit, "model", gen.need_parts)

    def _fits(self, gen: Generation) -> bool:
        self._never_fits(gen)
        need = max(0, gen.need - gen.reused_bytes)
        lm = gen.lm
        own = [g for g in self.running() if g is not gen]
        others = own + (self.beside.running() if self.beside else [])
        model_out = sum(g.need for g in others if g.lm is lm)
        limit = memory.worker_limit()
        model_limit = getattr(lm, "memory_limit", None)
        for attempt in range(2):
            estimate = self.estimate(gen)
            # the model's own limit holds its weights, its prompt-cache entries and its requests
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

    def estimate(self, gen: Generation) -> int:
        """The peak expected with ``gen`` running beside the admitted
        requests: what is resident (active memory less what the running
        requests' caches hold now), every request's KV up to its
        max_tokens, a batch's padding, and the largest one's temporaries
        (prefill chunks run one at a time) — or, where prompts will share
        prefill chunks, those chunks beside the others' KV."""
        others = [g for g in self.running() if g is not gen]
        if self.beside:
            others += self.beside.running()
        resident = mx.get_active_memory() - self._held() - (self.beside._held() if self.beside else 0)
        gens = others + [gen]
        kv = sum(g.need_parts.get("kv_cache", 0) for g in gens)
        temporaries = max(memory_model.temporaries(g.need, g.need_parts, g.cache is None or g.to_prefill <= 0)
                          for g in gens)
        padding, merge = self._padding(gen, others)
        peak = kv + padding + max(temporaries, merge)
        # Prompts of one model prefill together (_prefill_one) while shallow:
        # their shared chunks, played out from where each prompt is now,
        # beside the others' KV.
        together = [g for g in gens if g.lm is gen.lm and g.cache is not None and g.to_prefill > 0
                    and g.batchable and g.step_size == gen.step_size][:MAX_PREFILL_ROWS]
        if gen in together and len(together) > 1:
            rest = [g for g in gens if g not in together]
            rows = [(g.processed, g.n_prompt, g.max_tokens, g.need_parts.get("kv_cache", 0)) for g in together]
            batch = [(g.n_prompt, g.max_tokens) for g in rest if g.lm is gen.lm and self._batchable(g)]
            peak = max(peak, sum(g.need_parts.get("kv_cache", 0) for g in rest)
                       + memory_model.co_prefill(gen.lm, rows, gen.step_size, batch))
        return max(0, resident) + peak - gen.reused_bytes

    def _held(self) -> int:
        """Bytes the running requests' caches hold now (between steps)."""
        total = 0
        for g in self.prefilling:
            total += _nbytes(g.cache)
        for group in list(self.groups.values()) + self.solo:
            total += _nbytes(group.cache)
        return total

    def _batchable(self, g: Generation) -> bool:
        if g.cache is None:  # in a decode group, which owns its KV
            return any(g in group.rows for group in self.groups.values())
        return g.batchable

    def _padding(self, gen: Generation, others: list) -> tuple[int, int]:
        if not gen.batchable:
            return 0, 0
        rows = [(g.n_prompt, g.max_tokens) for g in others + [gen] if g.lm is gen.lm and self._batchable(g)]
        return memory_model.padded(gen.lm, rows)

    def _evict(self, gen: Generation, nbytes: int) -> bool:
        """Evict oldest-first across the stores (cache_budget.py): first from
        those no admitted request uses (other models', idle draft pairs'),
        then from all."""
        from .cache_budget import budget

        busy = {id(s) for s in _stores([gen] + self.running() + (self.beside.running() if self.beside else []))}
        idle = [s for s in self.all_stores() if s is not None and id(s) not in busy]
        freed = budget().evict(nbytes, first=idle)
        if freed:
            mx.clear_cache()
            log.info("prompt cache: evicted %d bytes to admit a request", freed)
        return freed > 0

    def _start(self, gen: Generation) -> None:
        _mark_waiting(gen, False)
        self._admissions += 1
        gen.admitted = self._admissions
        estimate = self.estimate(gen)
        if gen.memory_base is not None:  # arrived idle: memory before its own work (vision tower, lease)
            estimate = max(estimate, gen.memory_base + max(0, gen.need - gen.reused_bytes))
        gen.memory_estimate = memory.track(gen.request_id, gen.lm.model_id, estimate, gen.need - gen.reused_bytes)
        for g in self.running() + (self.beside.running() if self.beside else []):
            g.memory_estimate = max(g.memory_estimate or 0, gen.memory_estimate)
        if gen.to_prefill > 0:
            self.prefilling.append(gen)
        else:
            self._to_decode(gen)

    def _to_decode(self, gen: Generation) -> None:
        gen.computed = True
        if gen.max_tokens == 0:
            self._prime_only(gen)
            return
        if gen.draft is not None:  # speculative: its own sequential group
            group = gen.draft.group(gen)
            self.solo.append(group)
            return
        if gen.batchable:
            group = self.groups.setdefault(id(gen.lm.model), DecodeGroup(gen.lm.model, True))
        else:
            group = DecodeGroup(gen.lm.model, False)
            self.solo.append(group)
        group.join(gen)

    def _prime_only(self, gen: Generation) -> None:
        """max_tokens 0: feed the prompt's last token (the cache then holds
        the whole prompt, as mlx-lm leaves it) and end."""
        try:
            last, emb = gen.last_input()
            gen.begin()
            kwargs = {"input_embeddings": emb[None]} if emb is not None else {}
            gen.lm.model(last[None], cache=gen.cache, **kwargs)
            mx.eval([c.state for c in gen.cache])
            gen.accept(0, None)
            outcome: object = gen.finish("cancelled" if gen.should_stop() else "max_tokens", gen.cache)
        except BaseException as exc:
            _abort(gen)
            outcome = exc
        self.done(gen, outcome)

    # --------------------------------------------------------------- step

    def step(self) -> None:
        if self.paused:
            self._resume_paused()
        if self.waiting:
            self._retry_waiting()
        if self.decoding() > 1:
            self._preempt()
        if self.prefilling:
            self._prefill_one()
        t0 = time.perf_counter()
        stepped = False
        for key, group in list(self.groups.items()):
            if group.rows:
                self._step_group(group)
                stepped = True
            if not group.rows:
                del self.groups[key]
        for group in list(self.solo):
            self._step_group(group)
            stepped = True
            if not group.rows:
                self.solo.remove(group)
        if stepped:
            dt = time.perf_counter() - t0
            self._step_s = dt if not self._step_s else 0.8 * self._step_s + 0.2 * dt

    def _retry_waiting(self) -> None:
        # A cancel takes effect at the next step, wherever the request waits
        # (not only once the ones ahead of it are admitted).
        for gen in [g for g in self.waiting if g.should_stop()]:
            self.waiting.remove(gen)
            self._in_hand = [gen]
            self._finish(gen, "cancelled", gen.cache)
            self._in_hand = []
        for _ in range(len(self.waiting)):
            gen = self.waiting.popleft()
            self._in_hand = [gen]
            if gen.should_stop():
                self._finish(gen, "cancelled", gen.cache)
            elif not self._admit_or_wait(gen, first=False):
                self.waiting.appendleft(gen)
                self._in_hand = []
                return  # in arrival order
            self._in_hand = []

    def _prefill_one(self) -> None:
        gen = self.prefilling.popleft()
        if gen.should_stop():
            self._finish(gen, "cancelled", gen.cache)
            return
        n = gen.step_size
        decoding = self.decoding() > 0
        sized = decoding and (gen.batchable or _chunking_free(gen))
        if sized:
            n = min(n, self._chunk)
        # Prompts of the same model waiting together advance together: one
        # forward pass for a chunk of each (a pass costs far less than one
        # per prompt), as long as the KV merged for it stays small (a
        # prompt already deep in its cache goes on alone: merging would copy
        # all of it every chunk).
        together = [gen]
        shallow = lambda g: g.processed <= memory_model.shallow_limit(n)  # noqa: E731
        if gen.batchable and shallow(gen):
            for other in list(self.prefilling):
                if len(together) >= MAX_PREFILL_ROWS:
                    break
                if (other.lm is gen.lm and other.batchable and shallow(other)
                        and other.step_size == gen.step_size and not other.should_stop()):
                    self.prefilling.remove(other)
                    together.append(other)
        self._in_hand = together  # out of every queue until handed on
        for g in together:
            g.computed = True
        before = [g.processed for g in together]
        t0 = time.perf_counter()
        try:
            if len(together) > 1:
                prefill_together(gen.lm.model, together, n)
            else:
                gen.prefill(n, clear_cache=not decoding)
        except BaseException as exc:
            self._in_hand = []
            for g in together:
                self._fail(g, _memory_error(exc, g))
            return
        dt = time.perf_counter() - t0
        done = sum(g.processed - b for g, b in zip(together, before))
        log.debug("prefill of %d tokens (%d prompts) in %.1f ms (decoding: %d, step %.1f ms)",
                  done, len(together), dt * 1000, self.decoding(), self._step_s * 1000)
        if sized:
            self._tune_chunk(done, dt, gen.step_size)
        for g in together:
            self._after_chunk(g)
        self._in_hand = []

    def _after_chunk(self, gen: Generation) -> None:
        if gen.to_prefill > 0:
            self.prefilling.append(gen)  # the next prompt's turn
        elif gen.should_stop():
            self._finish(gen, "cancelled", gen.cache)
        else:
            self._to_decode(gen)

    def _tune_chunk(self, n: int, dt: float, limit: int) -> None:
        """Size the next chunk so that it takes about CHUNK_TIME_IN_STEPS
        decode steps: grown while chunks run shorter, shrunk while longer
        (a measured controller: a chunk's cost is not proportional to its
        tokens, small chunks carry fixed costs)."""
        if dt <= 0 or not self._step_s:
            return
        target = self._step_s * CHUNK_TIME_IN_STEPS
        chunk = self._chunk * (1.25 if dt < target else 0.8)
        self._chunk = int(max(MIN_CHUNK, min(limit, chunk)))

    def _step_group(self, group: DecodeGroup) -> None:
        for gen, outcome, cache in group.step():
            if isinstance(outcome, str):
                self._finish(gen, outcome, cache)
            else:
                self._fail(gen, _memory_error(outcome, gen))

    def _finish(self, gen: Generation, reason: str, cache) -> None:
        try:
            outcome: object = gen.finish(reason, cache)
        except BaseException as exc:
            _abort(gen)
            outcome = exc
        self.done(gen, outcome)

    def _fail(self, gen: Generation, exc: BaseException) -> None:
        """End a request with an error: its answer goes out even if giving
        back what it held fails (say, a distributed group that just died)."""
        try:
            _abort(gen)
        finally:
            self.done(gen, exc)

    def fail_all(self, exc: BaseException) -> None:
        """A bug in the scheduler itself: every request it holds ends with
        the error (a cancelled one with its cancelled result); it starts over."""
        gens, seen = [], set()
        for _, saved, _ in self.paused:
            saved.drop()
        held = self._in_hand + self.running() + list(self.waiting) + [p[0] for p in self.paused]
        for gen in held:  # in hand: popped, not handed on
            if id(gen) not in seen:
                seen.add(id(gen))
                gens.append(gen)
        self._in_hand = []
        self.paused.clear()
        self.waiting.clear()
        self.prefilling.clear()
        self.groups.clear()
        self.solo.clear()
        for gen in gens:
            try:
                self._fail(gen, exc)
            except BaseException:  # one answer that fails must not cost the others theirs
                log.exception("could not answer a request the scheduler held")

    # --------------------------------------------------------- preemption

    def _kv_estimate(self, also: Generation | None = None) -> int:
        """Resident memory + the running requests' KV to their max_tokens
        (no temporaries: what must fit for them all to finish)."""
        gens = self.running() + ([also] if also is not None else [])
        resident = mx.get_active_memory() - self._held()
        return max(0, resident) + sum(g.need_parts.get("kv_cache", 0) for g in gens)

    def _preempt(self) -> None:
        """The decoding requests' KV outgrew the limit: pause the youngest
        (its KV written to the disk tier's folder) until it fits again. Only
        with a disk tier: a pause that kept the KV in memory would free nothing."""
        limit = memory.worker_limit()
        while self.decoding() > 1 and self._kv_estimate() > limit:
            rows = [(g, group) for group in list(self.groups.values()) + self.solo
                    if isinstance(group, DecodeGroup) for g in group.rows]  # not a speculative group
            if not rows:
                return
            gen, group = max(rows, key=lambda r: getattr(r[0], "admitted", 0))
            folder = _pause_folder(gen)
            if folder is None:
                return
            batchable = group.batchable
            cache, y, lp = group.pause(gen)
            try:
                saved = paused_kv.stash(folder, cache, y, lp)
            except OSError:
                log.warning("could not pause a request (its KV could not be written); it goes on")
                group.resume(gen, cache, y, lp)
                return
            del cache
            if not group.rows:
                self._drop_group(group)
            mx.clear_cache()
            self.paused.append((gen, saved, batchable))
            log.info("paused request %r: %d bytes of KV written out", gen.request_id, saved.nbytes)

    def _drop_group(self, group: DecodeGroup) -> None:
        if group in self.solo:
            self.solo.remove(group)
        for key, g in list(self.groups.items()):
            if g is group:
                del self.groups[key]

    def _resume_paused(self) -> None:
        """Resume the paused requests, oldest first, as soon as each fits
        (or nothing else runs); a cancelled one ends with its output so far."""
        limit = memory.worker_limit()
        while self.paused:
            gen, saved, batchable = self.paused[0]
            if gen.should_stop() or not self.running() or self._kv_estimate(gen) <= limit:
                self.paused.pop(0)
                try:
                    cache, y, lp = saved.restore()
                except BaseException as exc:
                    saved.drop()
                    self._fail(gen, _memory_error(exc, gen))
                    continue
                if gen.should_stop():
                    self._finish(gen, "cancelled", cache)
                    continue
                if batchable:
                    group = self.groups.setdefault(id(gen.lm.model), DecodeGroup(gen.lm.model, True))
                else:
                    group = DecodeGroup(gen.lm.model, False)
                    self.solo.append(group)
                group.resume(gen, cache, y, lp)
                log.info("resumed request %r", gen.request_id)
            else:
                return

    # ------------------------------------------------------------ unload

    def holds(self, lm) -> bool:
        return any(g.lm is lm or g.draft_lm is lm
                   for g in self.running() + list(self.waiting) + [p[0] for p in self.paused])


def _stores(gens: list[Generation]):
    seen = set()
    for g in gens:
        for store in (g.lm.prompt_cache, g.draft.store if g.draft is not None else None):
            if store is not None and id(store) not in seen:
                seen.add(id(store))
                yield store


def _chunking_free(gen: Generation) -> bool:
    """A request outside the batch whose output doesn't depend on how its
    prompt is chunked (plain or quantized KV on a text model, a draft pair
    included), so its chunks can be sized for the running streams too.
    Windows and recurrent state keep their own ``prefill_step_size``: there
    the chunking is part of the result (see the spec's Rotating caches)."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    return gen.lm.vision is None and all(type(c) in (KVCache, QuantizedKVCache) for c in gen.cache)


def _mark_waiting(gen: Generation, waiting: bool) -> None:
    """What ``status`` reports: a request waiting for memory is not running yet."""
    job = getattr(gen, "job", None)
    if job is not None:
        job.waiting = waiting


def _pause_folder(gen: Generation):
    """Where a paused request's KV goes: its model's disk tier, else the worker's."""
    from .cache_disk import tier_for

    tier = getattr(gen.lm.prompt_cache, "disk", None) or tier_for(None, None)
    return tier.folder if tier is not None else None


def _model_stores(lm) -> list:
    from .speculative import pair_stores

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
    from .prompt_cache import cache_nbytes

    try:
        return cache_nbytes(cache)
    except Exception:
        return 0


def _abort(gen: Generation) -> None:
    try:
        gen.abort()
    except BaseException:  # Generation.abort shouldn't raise; the answer matters more
        log.exception("giving back a failed request's resources failed")


def _memory_error(exc: BaseException, gen: Generation) -> BaseException:
    """An allocation failure ends this request only: -32005 with what it streamed."""
    if isinstance(exc, MemoryError):
        return WorkerError(errors.OUT_OF_MEMORY, f"out of memory during generation: {exc}",
                           {"text": "".join(gen.text_parts), "tokens": list(gen.generated)})
    return exc


def run_alone(gen: Generation, beside: "Scheduler | None" = None) -> object:
    """Drive one request to its end outside the shared batch (cache_save's
    prefill): the same phases, chunks and cancel checks, admitted beside
    ``beside``'s requests (paused meanwhile). Returns its result or the
    exception it ended with."""
    outcome: list = []
    alone = Scheduler(lambda g, o: outcome.append(o), beside.all_stores if beside else tuple, beside)
    alone.submit(gen)
    while alone.busy() and not outcome:
        alone.step()
    return outcome[0]


def run(lm, params, request_id, events, should_stop) -> object:
    """One generate, alone, in-process (benchmarks): its result, or raises."""
    outcome = run_alone(Generation(lm, params, request_id, events, should_stop))
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome

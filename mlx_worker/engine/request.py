"""One generate request: its lifecycle state and what it holds.

QUEUED (created) -> PREPARING (prompt, plan, cache lease) -> WAITING_MEMORY
(not admitted yet) -> PREFILLING -> DECODING -> FINISHED. The scheduler moves
it between states and decides when it runs; the runner (runner.py) does its
forward passes; it knows nothing of how it is decoded (batch rows or draft
rounds). Spec: "`generate`", "`cancel`", "Batching".
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx

from ..cache import budget as cache_budget, disk as cache_disk, store as prompt_cache
from .. import prompt_bounds, protocol, sampling
from ..models.loaded import LoadedModel
from ..prompt import PreparedPrompt
from ..tools.checks import tool_dicts
from ..tools import calls as tool_calls
from . import result
from .decoder import Decoder
from .plan import Plan, prepare_prompt
from .sampler import RowSampler

log = logging.getLogger("mlx_worker.engine.request")


class RequestState(enum.Enum):
    QUEUED = "queued"
    PREPARING = "preparing"
    WAITING_MEMORY = "waiting_memory"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


class Cancelled(Exception):
    """The request was cancelled between two phases."""


@dataclass
class Events:
    progress: Callable[[protocol.ProgressEvent], None]
    # (event, sent): ``sent(event)`` once the event went out (what a cancelled result carries)
    token: Callable[[protocol.TokenEvent, Callable[[protocol.TokenEvent], None]], None]


class Request:
    def __init__(self, lm: LoadedModel, params: protocol.GenerateParams, request_id: protocol.RequestId,
                 events: Events, should_stop: Callable[[], bool], *, draft=None, received: Optional[float] = None,
                 close_cancel: Optional[Callable[[], bool]] = None):
        self.lm = lm
        self.params = params
        self.request_id = request_id
        self.events = events
        self.should_stop = should_stop
        # Closes the cancel window: whether a cancel came first (its answer must then say so).
        self.close_cancel = close_cancel or should_stop
        self.draft_choice = draft  # speculative decoding: speculative.resolve's DraftChoice, or None
        self.draft_lm: Optional[LoadedModel] = draft.lm if draft is not None else None
        self.start = time.perf_counter()
        self.received = self.start if received is None else received  # when it was read: queue time
        self.state = RequestState.QUEUED
        self.finish_reason: Optional[str] = None
        # prepare_prompt
        self.prompt: Optional[PreparedPrompt] = None
        self.keep = prompt_cache.DEFAULT_KEEP  # the prompt cache's keep and system-prompt end
        self.system_end = 0
        # prepare
        self.plan: Optional[Plan] = None
        self.decoder: Optional[Decoder] = None
        self.constraint = None  # the plan's, until released
        # open: the cache and the prompt's progress through it
        self.lease: Optional[prompt_cache.Lease] = None
        self.cache: Optional[list] = None  # None while a decode group owns its KV
        self.cached = 0
        self.processed = 0
        self.embeddings = None  # vision: the uncached part's input embeddings
        self.positions = None  # vision: the prompt's positions, set by the runner before each call
        self.sampler: Optional[RowSampler] = None
        self.primed = False  # the first decode step (the prompt's last token) ran
        self.computed = False  # the model ran on its cache (set by the runner before it does)
        # admission (scheduler)
        self.admitted = 0  # admission order: the youngest is preempted first
        self.memory_base: Optional[int] = None  # bytes in use when it arrived (or was admitted)
        self.memory_estimate: Optional[int] = None  # base + need: its expected peak
        self.stored: Optional[prompt_cache.Entry] = None  # what finish left in the store

    # ------------------------------------------------------------- prepare

    def prepare(self) -> None:
        """Everything before any MLX work on the model; may raise WorkerError."""
        if self.prompt is None:  # not prepared ahead (vision, cache_save): here, bounded
            with prompt_bounds.within(self.should_stop, inline=False):
                self.prepare_prompt()
        self.plan = Plan.build(self.lm, self.params, self.prompt, self.draft_choice, self._check_cancel)
        self.constraint = self.plan.constraint
        self.decoder = Decoder(self.lm, self.params, self.plan, self.request_id, self.events.token,
                               self.should_stop)

    def prepare_prompt(self) -> None:
        """The prompt's tokens (templates, tokenizing): touches no MLX state,
        so it may run off the compute thread (offload.py)."""
        sampling.validate(self.params, self.lm.vocab_size)
        self._check_cancel()
        try:
            self.prompt, self.keep, self.system_end = prepare_prompt(self.lm, self.params)
        except prompt_bounds.RenderStopped:
            raise Cancelled from None

    def _check_cancel(self) -> None:
        if self.should_stop():
            raise Cancelled

    # ---------------------------------------------------------------- open

    def open(self) -> None:
        """Take the prompt-cache lease: the cache to continue from."""
        lm, params, plan = self.lm, self.params, self.plan
        keep, draft = self.keep, plan.draft
        store = lm.prompt_cache if draft is None else draft.store
        if params.prompt_cache and store is not None:
            self.lease = _lease(lm, store, self.prompt.cache_key, plan.step_size, keep, self.system_end)
            self.cache, self.cached = self.lease.cache, self.lease.cached
            self.lease.cache = None  # the request owns it now (it may move into a batch)
        elif draft is not None:
            self.cache, self.cached = draft.new_cache(), 0
        else:
            self.cache, self.cached = prompt_cache.make_cache(lm, keep), 0
        self.processed = self.cached
        if self.prompt.embeddings is not None:
            self.embeddings, self.positions = self.prompt.embeddings(self.cached)
        key = sampling.request_key(plan.seed) if params.temperature else None
        self.sampler = RowSampler(plan.sample_fn, sampling.with_prefix(plan.processors, self.prompt.tokens[: self.cached]),
                                  key, self.prompt.tokens[self.cached : -1])
        self._progress(self.cached)

    @property
    def reused_bytes(self) -> int:
        return self.lease.reused_bytes if self.lease is not None else 0

    @property
    def need(self) -> int:
        return self.plan.need if self.plan is not None else 0

    @property
    def need_parts(self) -> dict:
        return self.plan.need_parts if self.plan is not None else {}

    @property
    def n_prompt(self) -> int:
        return self.plan.n_prompt

    @property
    def max_tokens(self) -> int:
        return self.plan.max_tokens

    @property
    def batchable(self) -> bool:
        """Plain KV layers (a text model's, or a vision family's in vision/lm.py's BATCH_FAMILIES)
        merge into a decode batch; anything else decodes on its own, interleaved with the batch."""
        from mlx_lm.models.cache import KVCache

        if self.plan.draft is not None or (self.lm.vision is not None and not self.lm.model.batch_decode):
            return False  # a draft: a decode group of its own (speculative.py)
        return all(type(c) is KVCache for c in self.cache)

    @property
    def text_batchable(self) -> bool:
        """Its prompt chunks may merge with others' too (a vision prompt's embeddings can't)."""
        return self.lm.vision is None and self.batchable

    # ------------------------------------------------------------- prefill

    @property
    def to_prefill(self) -> int:
        """Prompt tokens left before the last one (which the first decode step feeds)."""
        return self.plan.n_prompt - 1 - self.processed

    def next_chunk(self, n: int) -> int:
        """How many of the next ``n`` prompt tokens to prefill now: never the
        last one, and up to a checkpoint the lease wants (Lease.mark)."""
        n = min(n, self.to_prefill)
        stop = self.lease.next_stop(self.processed) if self.lease is not None else None
        if stop is not None:
            n = min(n, stop - self.processed)
        return n

    def pending_tokens(self, n: int) -> list[int]:
        """The next ``n`` prompt tokens to prefill (never the last one)."""
        return self.prompt.tokens[self.processed : self.processed + min(n, self.to_prefill)]

    def prefilled(self, n: int, cache: list) -> None:
        """``n`` more prompt tokens went through ``cache``."""
        self.cache = cache
        self.processed += n
        if self.lease is not None:
            self.lease.progress(self.cache, self.processed)
        self._progress(self.processed)

    def last_input(self) -> tuple[mx.array, Optional[mx.array]]:
        """The prompt's last token (and its embedding): the first decode step's input."""
        last = mx.array(self.prompt.tokens[-1:], dtype=mx.uint32)
        emb = None
        if self.embeddings is not None:
            emb = self.embeddings[-1:]
        return last, emb

    def _progress(self, processed: int) -> None:
        self.events.progress(protocol.ProgressEvent(id=self.request_id, processed=processed,
                                                    total=self.plan.n_prompt, cached=self.cached))

    # -------------------------------------------------------------- decode

    def accept(self, token: int, logprobs: Optional[mx.array]) -> Optional[str]:
        """A token the last step produced, now read; the stop reason when the
        request ends here, else None."""
        if not self.primed:  # the fed token was the prompt's last: no output yet
            self.primed = True
            self._progress(self.plan.n_prompt)
            return "cancelled" if self.should_stop() else None
        return self.decoder.accept(token, logprobs)

    # --------------------------------------------------------------- end

    def finish(self, stop_reason: str, cache: Optional[list]) -> protocol.GenerateResult:
        """The result; ``cache`` is this request's own KV (out of the batch),
        committed to the prompt cache."""
        stop_reason = self.decoder.finish(stop_reason)
        calls, invalid_calls = tool_calls.collect(self.lm.tokenizer, self.decoder.channels.calls,
                                                  stop_reason == "eos", tool_dicts(self.params.tools))
        end = time.perf_counter()
        if self.lease is not None:
            self.stored = self.lease.commit(self.prompt, cache if cache is not None else self.cache,
                                            self.decoder.sampled, stop_reason)
        complete = protocol.UNSET
        if self.constraint is not None:
            complete = self.constraint.complete(self.decoder.generated)
            self.constraint.release()
            self.constraint = None
        self.finish_reason = stop_reason
        return result.assemble(self, stop_reason, end, calls, invalid_calls, complete, mx.get_peak_memory())

    def cancelled_result(self) -> protocol.GenerateResult:
        """What a cancel answers when the work could not finish: what its token events delivered."""
        streamed = self.decoder.streamed if self.decoder is not None else None
        return result.cancelled(self.params, streamed, result.queue_ms(self.received, self.start))

    def abort(self) -> None:
        """The request failed: give back what it took. Never raises (the
        request's answer must still go out)."""
        try:
            if self.lease is not None:
                self.lease.abort(poisoned=self.computed)
        except BaseException:
            log.exception("prompt cache: giving back a failed request's entry failed")
        try:
            if self.constraint is not None:
                self.constraint.release()
        except BaseException:
            log.exception("releasing a failed request's constraint failed")
        self.constraint = None


def _lease(lm: LoadedModel, store, key: list, step: int, keep: int, system_end: int) -> "prompt_cache.Lease":
    """The store's lease on the longest cached prefix of ``key``, from RAM or
    (when the disk tier holds a longer one) restored from disk first."""
    lease = store.fetch(key, step=step, keep=keep)
    if cache_disk.restore(lm, store, key, lease.cached):
        # The disk tier had a longer prefix: now in the store, fetched as any entry.
        lease.abort()
        lease = store.fetch(key, step=step, keep=keep)
    if lease.cached:
        cache_budget.budget().hits += 1
    if lease.stateful:
        lease.mark(system_end)
    return lease

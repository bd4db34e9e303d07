"""One generation request's state, from its params to its result.

A ``Generation`` decides what goes in (the uncached part of the prompt,
vision embeddings, its sampler, logits processors and PRNG key) and what
comes out (token events with exact text, stop handling, usage, timings, the
prompt-cache commit). It does not decide *when* it runs: the scheduler
(scheduler.py) prefills it chunk by chunk and decodes it in a batch with the
other requests of its model (batch.py). It knows nothing of pipes or
JSON-RPC: the caller passes callbacks for events and a function that says
when to stop.

Phases: ``prepare`` (validate, tokenize, render templates, compile the
constraint; bounded and checked for cancel between steps) -> ``open``
(prompt-cache lease) -> ``prefill`` chunks -> decode steps (``sample`` and
``accept``) -> ``finish`` (result; lease committed) or ``abort`` (lease
given back).

Samples depend only on the request: its own PRNG key is split once per
sampled token, so with the same seed its tokens are the same whether it runs
alone or in any batch (up to the rounding of batched matrix products; see
the spec's "Batching").
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx

from ..cache import budget as cache_budget, disk as cache_disk, store as prompt_cache
from .. import errors, faults, memory, prompt_bounds, protocol, sampling, system_prompt
from . import speculative
from ..tools import calls as tool_calls
from ..tools import grammar as tool_grammar
from ..tools.channels import ChannelSplitter
from ..errors import WorkerError
from ..models.loaded import LoadedModel
from ..prompt import PreparedPrompt, prepare, tool_dicts
from ..textstream import TextStream

log = logging.getLogger("mlx_worker.engine.generation")


class Cancelled(Exception):
    """The request was cancelled between two phases."""


@dataclass
class Events:
    progress: Callable[[protocol.ProgressEvent], None]
    token: Callable[[protocol.TokenEvent], None]


class Generation:
    def __init__(
        self,
        lm: LoadedModel,
        params: protocol.GenerateParams,
        request_id: protocol.RequestId,
        events: Events,
        should_stop: Callable[[], bool],
    ):
        self.lm = lm
        self.params = params
        self.request_id = request_id
        self.events = events
        self.should_stop = should_stop
        self.start = time.perf_counter()
        self.lease: Optional[prompt_cache.Lease] = None
        self.prompt: Optional[PreparedPrompt] = None
        self.keep = prompt_cache.DEFAULT_KEEP  # the prompt cache's keep and system-prompt end (prepare_prompt)
        self.system_end = 0
        self.constraint = None
        self.stored: Optional[prompt_cache.Entry] = None  # what finish left in the store
        self.need_parts: dict = {}
        self.need = 0  # bytes admitted for this request (memory.py's estimate)
        self.memory_base: Optional[int] = None  # bytes in use when it arrived (or was admitted)
        self.memory_estimate: Optional[int] = None  # base + need: its expected peak
        # Decoding state.
        self.generated: list[int] = []  # returned tokens (no terminating EOS)
        self.fed_back: list[int] = []  # every sampled token, EOS included: they are in the KV cache
        self.text_parts: list[str] = []
        self.stop_token: Optional[int] = None
        self.first_token_at: Optional[float] = None
        self.primed = False  # the first decode step (the prompt's last token) ran
        self.computed = False  # the model ran on its cache (set by the scheduler before it does)
        self.positions = None  # vision: the prompt's position plan, re-set before each model call
        self.draft_lm: Optional[LoadedModel] = None  # speculative decoding: set by the caller
        self.num_draft_tokens = 0
        self.draft: Optional[speculative.Draft] = None

    # ------------------------------------------------------------- prepare

    def prepare(self) -> None:
        """Everything before any MLX work on the model; may raise WorkerError."""
        lm, params = self.lm, self.params
        if self.prompt is None:  # not prepared ahead (vision, cache_save): here, bounded
            with prompt_bounds.within(self.should_stop, inline=False):
                self.prepare_prompt()
        self.n_prompt = len(self.prompt.tokens)
        self.max_tokens = _clamp_to_context(lm, self.n_prompt, params.max_tokens)
        self.step_size = params.prefill_step_size or lm.prefill_step_size
        self._check_cancel()
        self.sample_fn, self.processors = sampling.make(params, lm)
        self.constraint = _compile_constraint(lm, params)
        if self.constraint is not None:
            self.processors = self.processors + [self.constraint.processor()]
        # A run that samples nothing (max_tokens 0: cache_save, cache warming)
        # needs no tool processor: the tools only shape the prompt. Malformed
        # tool params are still named.
        tool_grammar.chosen_tools(params)
        tool_processor = tool_grammar.processor_for(lm, params) if self.max_tokens > 0 else None
        if tool_processor is not None:
            self.processors = self.processors + [tool_processor]
        # The lazy tool grammar follows the tokens as they are read.
        self.observe = getattr(tool_processor, "observe", None)
        if self.draft_lm is not None and self.max_tokens > 0:
            self.draft = speculative.Draft.for_request(lm, self.draft_lm, self.num_draft_tokens, params, tool_processor)
        self._check_cancel()
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        self.key = sampling.request_key(self.seed) if params.temperature else None
        self.stream = TextStream(lm.decode, self.prompt.tokens, sampling.stop_strings(params))
        self.channels = ChannelSplitter.for_model(lm.tokenizer, self.prompt.tokens)
        self.stop_ids = set(params.stop_token_ids)
        # Under a constraint (or a call grammar) EOS is allowed only once it is
        # complete, and it ends the output: ignore_eos does not apply. ("none"
        # only bans the start marker: not a grammar.)
        constrained = self.constraint is not None or tool_grammar.is_call_grammar(tool_processor)
        self.eos_ids = set() if params.ignore_eos and not constrained else set(lm.eos_token_ids)
        self.want_logprobs = params.logprobs or params.top_logprobs > 0
        self.need, self.need_parts = memory.generate_need(lm, self.n_prompt, self.max_tokens, self.step_size)
        if self.draft is not None:
            # Both caches are held; the two models' chunks run one after the other.
            draft_need, draft_parts = memory.generate_need(self.draft.lm, self.n_prompt, self.max_tokens, self.step_size)
            kv = self.need_parts["kv_cache"] + draft_parts["kv_cache"]
            self.need = kv + max(self.need - self.need_parts["kv_cache"], draft_need - draft_parts["kv_cache"])
            self.need_parts = {**self.need_parts, "kv_cache": kv, "draft": draft_need}

    def prepare_prompt(self) -> None:
        """The prompt's tokens (templates, tokenizing): touches no MLX state,
        so it may run off the compute thread (offload.py)."""
        sampling.validate(self.params, self.lm.vocab_size)
        self._check_cancel()
        lm, params = self.lm, self.params
        try:
            prompt = prepare(lm, params)
            # The system messages rendered alone, for the prompt cache: template work too, so here.
            keep = system_prompt.keep_for(lm, params, prompt.tokens)
            store = lm.prompt_cache
            system_end = system_prompt.system_end(lm, params, prompt.tokens) \
                if params.prompt_cache and store is not None and store.stateful else 0
        except prompt_bounds.RenderStopped:
            raise Cancelled from None
        if not prompt.tokens:  # e.g. a template that renders nothing (on any model kind)
            raise errors.invalid_params("params.messages", "the prompt is empty after tokenization")
        self.prompt, self.keep, self.system_end = prompt, keep, system_end

    def _check_cancel(self) -> None:
        if self.should_stop():
            raise Cancelled

    # ---------------------------------------------------------------- open

    def open(self) -> None:
        """Take the prompt-cache lease: the cache to continue from."""
        lm, params = self.lm, self.params
        keep = self.keep
        store = lm.prompt_cache if self.draft is None else self.draft.store
        if params.prompt_cache and store is not None:
            self.lease = store.fetch(self.prompt.cache_key, step=self.step_size, keep=keep)
            if cache_disk.restore(lm, store, self.prompt.cache_key, self.lease.cached):
                # The disk tier had a longer prefix: now in the store, fetched as any entry.
                self.lease.abort()
                self.lease = store.fetch(self.prompt.cache_key, step=self.step_size, keep=keep)
            if self.lease.cached:
                cache_budget.budget().hits += 1
            self.cache, self.cached = self.lease.cache, self.lease.cached
            if self.lease.stateful:
                self.lease.mark(self.system_end)
            self.lease.cache = None  # the request owns it now (it may move into a batch)
        elif self.draft is not None:
            self.cache, self.cached = self.draft.new_cache(), 0
        else:
            self.cache, self.cached = prompt_cache.make_cache(lm, keep), 0
        self.processed = self.cached
        self.embeddings = self.prompt.embeddings(self.cached) if self.prompt.embeddings is not None else None
        if lm.vision is not None:
            self.positions = lm.model.plan
        self.history = mx.array(self.prompt.tokens[self.cached : -1], dtype=mx.uint32)
        self.processors = sampling.with_prefix(self.processors, self.prompt.tokens[: self.cached])
        self._progress(self.cached)

    @property
    def reused_bytes(self) -> int:
        return self.lease.reused_bytes if self.lease is not None else 0

    @property
    def batchable(self) -> bool:
        """Plain KV layers on a text model merge into a batch; anything else
        (windows, recurrent state, quantized KV, vision positions) decodes on
        its own, interleaved with the batch."""
        from mlx_lm.models.cache import KVCache

        if self.draft is not None:  # a decode group of its own (speculative.py)
            return False
        return self.lm.vision is None and all(type(c) is KVCache for c in self.cache)

    # ------------------------------------------------------------- prefill

    @property
    def to_prefill(self) -> int:
        """Prompt tokens left before the last one (which the first decode step feeds)."""
        return self.n_prompt - 1 - self.processed

    def prefill(self, n: int, clear_cache: bool = True) -> None:
        """Process the next ``n`` prompt tokens (never the last one).
        ``clear_cache``: free MLX's buffer cache after the chunk, as mlx-lm
        does; not while other streams decode (their next step would have to
        allocate its buffers afresh)."""
        n = min(n, self.to_prefill)
        stop = self.lease.next_stop(self.processed) if self.lease is not None else None
        if stop is not None:  # a checkpoint is wanted there (prompt_cache.Lease.mark)
            n = min(n, stop - self.processed)
        if n <= 0:
            return
        faults.hit("prefill")
        start = self.processed - self.cached  # into the uncached part
        tokens = mx.array(self.prompt.tokens[self.processed : self.processed + n], dtype=mx.uint32)
        self.begin()
        kwargs = {}
        if self.embeddings is not None:
            kwargs["input_embeddings"] = self.embeddings[start : start + n][None]
        if self.draft is not None:
            self.draft.prefill(tokens, self.cache)
        else:
            self.lm.model(tokens[None], cache=self.cache, **kwargs)
        mx.eval([c.state for c in self.cache])
        self.processed += n
        if self.lease is not None:
            self.lease.progress(self.cache, self.processed)
        self._progress(self.processed)
        if clear_cache:
            mx.clear_cache()

    def pending_tokens(self, n: int) -> list[int]:
        """The next ``n`` prompt tokens to prefill (never the last one)."""
        return self.prompt.tokens[self.processed : self.processed + min(n, self.to_prefill)]

    def prefilled(self, n: int, cache: list) -> None:
        """``n`` more tokens went through ``cache`` (a batched prefill's share)."""
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

    def begin(self) -> None:
        """Vision: tell the language model this request's positions."""
        if self.lm.vision is not None:
            self.lm.model.begin(self.positions)

    def _progress(self, processed: int) -> None:
        self.events.progress(
            protocol.ProgressEvent(id=self.request_id, processed=processed, total=self.n_prompt, cached=self.cached)
        )

    # -------------------------------------------------------------- decode

    def sample(self, logits: mx.array, fed: mx.array) -> tuple[mx.array, mx.array]:
        """This request's next token from its row of logits (1, vocab); ``fed``
        is the token the step fed (lazy). Returns (token (1,), logprobs (vocab,))."""
        faults.hit("decode")
        if self.processors:
            self.history = mx.concatenate([self.history, fed.astype(self.history.dtype)])
            for p in self.processors:
                logits = p(self.history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.key is None:
            token = self.sample_fn(logprobs, None)
        else:
            self.key, sub = sampling.split_key(self.key)
            token = self.sample_fn(logprobs, sub)
        return token, logprobs[0]

    def accept(self, token: int, logprobs: Optional[mx.array]) -> Optional[str]:
        """A token the last step produced, now read; the stop reason when the
        request ends here, else None."""
        if not self.primed:  # the fed token was the prompt's last: no output yet
            self.primed = True
            self._progress(self.n_prompt)
            return "cancelled" if self.should_stop() else None
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.fed_back.append(token)
        if self.observe is not None:
            self.observe(token)
        if token in self.eos_ids or token in self.stop_ids:
            self.stop_token = token
            return "eos"
        self.generated.append(token)
        text = self.stream.push(token)
        self.text_parts.append(text)
        logprob = [_logprob(token, logprobs, self.params.top_logprobs)] if self.want_logprobs else protocol.UNSET
        self._send_pieces(self.channels.push(text, token), [token], logprob)
        if self.stream.stopped:
            return "stop_string"
        if len(self.fed_back) >= self.max_tokens:
            return "max_tokens"
        if self.should_stop():
            return "cancelled"
        return None

    # --------------------------------------------------------------- end

    def finish(self, stop_reason: str, cache: Optional[list]) -> protocol.GenerateResult:
        """The result; ``cache`` is this request's own KV (out of the batch),
        committed to the prompt cache."""
        stream = self.stream
        tail = stream.finish()
        self.text_parts.append(tail)
        pieces = self.channels.push(tail) + self.channels.finish()
        if pieces:
            self._send_pieces(pieces, [], protocol.UNSET)
        if stream.stopped and stop_reason != "cancelled":
            # Only a stop string ending in held-back bytes is found this late; it
            # was complete before whatever token ended the loop.
            stop_reason, self.stop_token = "stop_string", None
        calls, invalid_calls = tool_calls.collect(self.lm.tokenizer, self.channels.calls, stop_reason == "eos",
                                                  tool_dicts(self.params.tools))
        end = time.perf_counter()
        if self.lease is not None:
            self.stored = self.lease.commit(self.prompt, cache if cache is not None else self.cache,
                                            self.fed_back, stop_reason)
        complete = protocol.UNSET
        if self.constraint is not None:
            complete = self.constraint.complete(self.generated)
            self.constraint.release()
            self.constraint = None
        first = self.first_token_at
        prefill_s = (first or end) - self.start
        decode_s = end - (first or end)
        uncached = self.n_prompt - self.cached
        usage = protocol.Usage(prompt_tokens=self.n_prompt, cached_tokens=self.cached,
                               completion_tokens=len(self.generated))
        if self.draft is not None:
            usage.draft_tokens, usage.accepted_draft_tokens = self.draft.proposed, self.draft.accepted
            usage.draft_rounds = list(self.draft.lengths)
        return protocol.GenerateResult(
            text="".join(self.text_parts),
            tokens=self.generated,
            stop_reason=stop_reason,  # type: ignore[arg-type]
            usage=usage,
            timings=protocol.Timings(
                ttft_ms=round(prefill_s * 1000, 3) if first else 0.0,
                prompt_tps=round(uncached / prefill_s, 2) if first and prefill_s > 0 else 0.0,
                generation_tps=round((len(self.fed_back) - 1) / decode_s, 2)
                if len(self.fed_back) > 1 and decode_s > 0 else 0.0,
                total_ms=round((end - self.start) * 1000, 3),
            ),
            peak_memory=mx.get_peak_memory(),
            model_id=self.lm.model_id,
            seed=self.seed,
            content=self.channels.texts["content"],
            reasoning=self.channels.texts["reasoning"],
            tool_calls=calls,
            invalid_tool_calls=invalid_calls,
            stop_string=stream.stop_string,
            stop_token=self.stop_token,
            constraint_complete=complete,
            memory_estimate=self.memory_estimate,
        )

    def _send_pieces(self, pieces, tokens: list[int], logprobs) -> None:
        """One token event per channel piece; the first carries the token (and
        its logprobs). A token whose text is held still gets its event."""
        if not pieces:
            pieces = [self.channels.empty_piece()]
        for i, piece in enumerate(pieces):
            event = protocol.TokenEvent(id=self.request_id, text=piece.text, tokens=tokens if i == 0 else [],
                                        logprobs=logprobs if i == 0 else protocol.UNSET, channel=piece.channel)
            if piece.call is not None:
                event.tool_call_index = piece.call
            self.events.token(event)

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


def _clamp_to_context(lm: LoadedModel, n_prompt: int, max_tokens: int) -> int:
    ctx = lm.context_length
    if ctx is None:
        return max_tokens
    if n_prompt > ctx:
        raise WorkerError(
            errors.CONTEXT_OVERFLOW,
            f"prompt is {n_prompt} tokens; the model's context is {ctx}",
            {"prompt_tokens": n_prompt, "context_length": ctx},
        )
    if lm.max_kv_size:  # a rotating cache lets generation run past the context
        return max_tokens
    return min(max_tokens, ctx - n_prompt)


def _logprob(token: int, logprobs: mx.array, top: int) -> protocol.TokenLogprob:
    entry = protocol.TokenLogprob(token=token, logprob=logprobs[token].item())
    top = min(top, logprobs.shape[-1])  # a vocabulary smaller than top_logprobs
    if top > 0:
        ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
        values = logprobs[ids].tolist()
        # A constraint masks tokens to -inf: they are not candidates.
        pairs = sorted(((t, v) for t, v in zip(ids.tolist(), values) if v != float("-inf")), key=lambda p: -p[1])
        entry.top = [protocol.TopLogprob(token=t, logprob=v) for t, v in pairs]
    return entry


def _compile_constraint(lm: LoadedModel, params: protocol.GenerateParams):
    if params.constraint is None:
        return None
    try:
        from .. import constraints  # late: llguidance/outlines only when a request has a constraint
    except ImportError:
        raise WorkerError(
            errors.CONSTRAINT_INVALID,
            "constrained generation is not available in this build",
            {"field": "params.constraint"},
        ) from None
    return constraints.compile_for(lm, params.constraint)

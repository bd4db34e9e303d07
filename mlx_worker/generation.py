"""The one generation loop: text and vision, cached, constrained, streamed.

Built on mlx-lm's ``generate_step``: this module only decides what goes in
(the uncached part of the prompt, vision embeddings, the sampler and logits
processors) and what comes out (token events with exact text, stop handling,
usage and timings). It knows nothing of pipes or JSON-RPC: the caller passes
callbacks for events and a function that says when to stop.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.generate import generate_step

from . import errors, memory, prompt_cache, protocol, sampling, tool_calls, tool_grammar
from .channels import ChannelSplitter
from .errors import WorkerError
from .models import LoadedModel
from .prompt import PreparedPrompt, prepare, tool_dicts
from .textstream import TextStream

log = logging.getLogger("mlx_worker.generation")


class Cancelled(Exception):
    """Raised from the prefill progress callback to stop at a chunk boundary."""


@dataclass
class Events:
    progress: Callable[[protocol.ProgressEvent], None]
    token: Callable[[protocol.TokenEvent], None]


def run(
    lm: LoadedModel,
    params: protocol.GenerateParams,
    request_id: protocol.RequestId,
    events: Events,
    should_stop: Callable[[], bool],
) -> protocol.GenerateResult:
    start = time.perf_counter()
    sampling.validate(params, lm.vocab_size)
    prompt = prepare(lm, params)
    if not prompt.tokens:  # e.g. a template that renders nothing (on any model kind)
        raise errors.invalid_params("params.messages", "the prompt is empty after tokenization")
    n_prompt = len(prompt.tokens)
    max_tokens = _clamp_to_context(lm, n_prompt, params.max_tokens)
    memory.admit_generate(lm, n_prompt, max_tokens, params.prefill_step_size or lm.prefill_step_size)

    sampler, processors = sampling.make(params)
    constraint = _compile_constraint(lm, params)
    if constraint is not None:
        processors = processors + [constraint.processor()]
    # A run that samples nothing (max_tokens 0: cache_save, cache warming)
    # needs no tool processor: the tools only shape the prompt. Malformed
    # tool params are still named.
    tool_grammar.chosen_tools(params)
    tool_processor = tool_grammar.processor_for(lm, params) if max_tokens > 0 else None
    if tool_processor is not None:
        processors = processors + [tool_processor]
    observe = getattr(tool_processor, "observe", None)  # the lazy tool grammar follows the tokens

    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
    mx.random.seed(seed)
    mx.reset_peak_memory()

    cache, cached = _fetch_cache(lm, params, prompt)
    fed = prompt.tokens[cached:]
    embeddings = prompt.embeddings(cached) if prompt.embeddings is not None else None
    processors = sampling.with_prefix(processors, prompt.tokens[:cached])

    def on_prefill(done: int, total: int) -> None:
        events.progress(
            protocol.ProgressEvent(id=request_id, processed=cached + done, total=n_prompt, cached=cached)
        )
        _prefilled(lm, params, cache, cached + done)
        if should_stop():
            raise Cancelled

    stops = sampling.stop_strings(params)
    stream = TextStream(lm.decode, prompt.tokens, stops)
    channels = ChannelSplitter.for_model(lm.tokenizer, prompt.tokens)
    stop_ids = set(params.stop_token_ids)
    # Under a constraint (or a call grammar) EOS is allowed only once it is
    # complete, and it ends the output: ignore_eos does not apply. ("none"
    # only bans the start marker: not a grammar.)
    constrained = constraint is not None or tool_grammar.is_call_grammar(tool_processor)
    eos_ids = set() if params.ignore_eos and not constrained else set(lm.eos_token_ids)
    want_logprobs = params.logprobs or params.top_logprobs > 0

    generated: list[int] = []  # returned tokens (no terminating EOS)
    fed_back: list[int] = []  # every sampled token, EOS included: they are in the KV cache
    text_parts: list[str] = []
    stop_reason: str = "max_tokens"
    stop_token: Optional[int] = None
    first_token_at: Optional[float] = None
    prefill_done_at: Optional[float] = None

    steps = generate_step(
        mx.array(fed),
        lm.model,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=processors or None,
        prompt_cache=cache,
        prefill_step_size=params.prefill_step_size or lm.prefill_step_size,
        prompt_progress_callback=on_prefill,
        input_embeddings=embeddings,
    )
    try:
        for token, logprobs in steps:
            if first_token_at is None:
                first_token_at = prefill_done_at = time.perf_counter()
            fed_back.append(token)
            if observe is not None:
                observe(token)
            if token in eos_ids or token in stop_ids:
                stop_reason, stop_token = "eos", token
                break
            generated.append(token)
            text = stream.push(token)
            text_parts.append(text)
            logprob = [_logprob(token, logprobs, params.top_logprobs)] if want_logprobs else protocol.UNSET
            _send_pieces(events, request_id, channels, channels.push(text, token), [token], logprob)
            if stream.stopped:
                stop_reason = "stop_string"
                break
            if should_stop():
                stop_reason = "cancelled"
                break
    except Cancelled:
        stop_reason = "cancelled"
    except MemoryError as exc:
        raise WorkerError(errors.OUT_OF_MEMORY, f"out of memory during generation: {exc}") from None
    finally:
        steps.close()

    tail = stream.finish()
    text_parts.append(tail)
    pieces = channels.push(tail) + channels.finish()
    if pieces:
        _send_pieces(events, request_id, channels, pieces, [], protocol.UNSET)
    if stream.stopped and stop_reason != "cancelled":
        # Only a stop string ending in held-back bytes is found this late; it
        # was complete before whatever token ended the loop.
        stop_reason, stop_token = "stop_string", None

    calls, invalid_calls = tool_calls.collect(lm.tokenizer, channels.calls, stop_reason == "eos", tool_dicts(params.tools))
    end = time.perf_counter()
    _store_cache(lm, params, prompt, cache, fed_back, stop_reason)
    complete = protocol.UNSET
    if constraint is not None:
        complete = constraint.complete(generated)
        constraint.release()

    prefill_s = ((prefill_done_at or end) - start)
    decode_s = end - (first_token_at or end)
    uncached = n_prompt - cached
    return protocol.GenerateResult(
        text="".join(text_parts),
        tokens=generated,
        stop_reason=stop_reason,  # type: ignore[arg-type]
        usage=protocol.Usage(prompt_tokens=n_prompt, cached_tokens=cached, completion_tokens=len(generated)),
        timings=protocol.Timings(
            ttft_ms=round(prefill_s * 1000, 3) if first_token_at else 0.0,
            prompt_tps=round(uncached / prefill_s, 2) if first_token_at and prefill_s > 0 else 0.0,
            generation_tps=round((len(fed_back) - 1) / decode_s, 2) if len(fed_back) > 1 and decode_s > 0 else 0.0,
            total_ms=round((end - start) * 1000, 3),
        ),
        peak_memory=mx.get_peak_memory(),
        model_id=lm.model_id,
        seed=seed,
        content=channels.texts["content"],
        reasoning=channels.texts["reasoning"],
        tool_calls=calls,
        invalid_tool_calls=invalid_calls,
        stop_string=stream.stop_string,
        stop_token=stop_token,
        constraint_complete=complete,
    )


def _send_pieces(events: Events, request_id, channels: ChannelSplitter, pieces, tokens: list[int], logprobs) -> None:
    """One token event per channel piece; the first carries the token (and
    its logprobs). A token whose text is held still gets its event."""
    if not pieces:
        pieces = [channels.empty_piece()]
    for i, piece in enumerate(pieces):
        event = protocol.TokenEvent(id=request_id, text=piece.text, tokens=tokens if i == 0 else [],
                                    logprobs=logprobs if i == 0 else protocol.UNSET, channel=piece.channel)
        if piece.call is not None:
            event.tool_call_index = piece.call
        events.token(event)


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
        from . import constraints
    except ImportError:
        raise WorkerError(
            errors.CONSTRAINT_INVALID,
            "constrained generation is not available in this build",
            {"field": "params.constraint"},
        ) from None
    return constraints.compile_for(lm, params.constraint)


def _fetch_cache(lm: LoadedModel, params: protocol.GenerateParams, prompt: PreparedPrompt):
    keep = prompt_cache.keep_for(lm, params, prompt.tokens)
    if params.prompt_cache and lm.prompt_cache is not None:
        step = params.prefill_step_size or lm.prefill_step_size
        return lm.prompt_cache.fetch(prompt.cache_key, step=step, keep=keep)
    return prompt_cache.make_cache(lm, keep), 0


def _prefilled(lm: LoadedModel, params: protocol.GenerateParams, cache, processed: int) -> None:
    if params.prompt_cache and lm.prompt_cache is not None:
        lm.prompt_cache.prefilled(cache, processed)


def _store_cache(lm, params, prompt: PreparedPrompt, cache, fed_back: list[int], stop_reason: str):
    if not params.prompt_cache or lm.prompt_cache is None:
        return
    lm.prompt_cache.insert(prompt, cache, fed_back, stop_reason)

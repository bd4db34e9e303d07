"""A generate's plan: everything decided from its params before any MLX work.

Built once (``Plan.build``) from the params, the loaded model and the
prepared prompt; every field is set there. The spec's "`generate`" section
describes what the fields bound (limits, sampling, constraint, tools, stop).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from .. import errors, memory, protocol, sampling, system_prompt
from ..errors import WorkerError
from ..models.loaded import LoadedModel
from ..prompt import PreparedPrompt, prepare
from ..tools import grammar as tool_grammar


@dataclass(frozen=True)
class Plan:
    prompt: PreparedPrompt
    n_prompt: int
    max_tokens: int
    step_size: int  # prefill chunk of a request alone
    sample_fn: Callable
    processors: list  # logits processors: sampling's, the constraint's, the tool grammar's
    constraint: object  # a compiled constraint (released by the request), or None
    observe: Optional[Callable[[int], None]]  # the lazy tool grammar follows the tokens as read
    draft: object  # speculative decoding's Draft (the runner variant's state), or None
    seed: int
    stop_ids: frozenset
    eos_ids: frozenset
    want_logprobs: bool
    top_logprobs: int
    need: int  # bytes admitted for this request (memory.py's estimate)
    need_parts: dict

    @classmethod
    def build(cls, lm: LoadedModel, params: protocol.GenerateParams, prompt: PreparedPrompt,
              draft_choice, check_cancel: Callable[[], None]) -> "Plan":
        """``draft_choice``: speculative.resolve's DraftChoice, or None."""
        n_prompt = len(prompt.tokens)
        max_tokens = _clamp_to_context(lm, n_prompt, params.max_tokens)
        step_size = params.prefill_step_size or lm.prefill_step_size
        check_cancel()
        sample_fn, processors = sampling.make(params, lm)
        constraint = _compile_constraint(lm, params)
        try:
            return cls._with_constraint(lm, params, prompt, draft_choice, check_cancel,
                                        max_tokens, step_size, sample_fn, processors, constraint)
        except BaseException:
            if constraint is not None:  # the plan never existed: nobody else would release it
                constraint.release()
            raise

    @classmethod
    def _with_constraint(cls, lm, params, prompt, draft_choice, check_cancel,
                         max_tokens, step_size, sample_fn, processors, constraint) -> "Plan":
        n_prompt = len(prompt.tokens)
        if constraint is not None:
            processors = processors + [constraint.processor()]
        # A run that samples nothing (max_tokens 0: cache_save, cache warming)
        # needs no tool processor: the tools only shape the prompt. Malformed
        # tool params are still named.
        tool_grammar.chosen_tools(params)
        tool_processor = tool_grammar.processor_for(lm, params) if max_tokens > 0 else None
        if tool_processor is not None:
            processors = processors + [tool_processor]
        draft = None
        if draft_choice is not None and max_tokens > 0:
            draft = draft_choice.draft_for(lm, params, tool_processor)
        check_cancel()
        # Under a constraint (or a call grammar) EOS is allowed only once it is
        # complete, and it ends the output: ignore_eos does not apply. ("none"
        # only bans the start marker: not a grammar.)
        constrained = constraint is not None or tool_grammar.is_call_grammar(tool_processor)
        need, need_parts = _need(lm, n_prompt, max_tokens, step_size, draft)
        return cls(
            prompt=prompt, n_prompt=n_prompt, max_tokens=max_tokens, step_size=step_size,
            sample_fn=sample_fn, processors=processors, constraint=constraint,
            observe=getattr(tool_processor, "observe", None), draft=draft,
            seed=params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little"),
            stop_ids=frozenset(params.stop_token_ids),
            eos_ids=frozenset() if params.ignore_eos and not constrained else frozenset(lm.eos_token_ids),
            want_logprobs=params.logprobs or params.top_logprobs > 0, top_logprobs=params.top_logprobs,
            need=need, need_parts=need_parts,
        )


def prepare_prompt(lm: LoadedModel, params: protocol.GenerateParams) -> tuple[PreparedPrompt, int, int]:
    """(the prompt, the prompt cache's keep, its system-prompt end): templates
    and tokenizing, no MLX state, so it may run off the compute thread."""
    prompt = prepare(lm, params)
    # The system messages rendered alone, for the prompt cache: template work too, so here.
    keep = system_prompt.keep_for(lm, params, prompt.tokens)
    store = lm.prompt_cache
    system_end = system_prompt.system_end(lm, params, prompt.tokens) \
        if params.prompt_cache and store is not None and store.stateful else 0
    if not prompt.tokens:  # e.g. a template that renders nothing (on any model kind)
        raise errors.invalid_params("params.messages", "the prompt is empty after tokenization")
    return prompt, keep, system_end


def _need(lm: LoadedModel, n_prompt: int, max_tokens: int, step_size: int, draft) -> tuple[int, dict]:
    need, parts = memory.generate_need(lm, n_prompt, max_tokens, step_size)
    if draft is not None:
        # Both caches are held; the two models' chunks run one after the other.
        draft_need, draft_parts = memory.generate_need(draft.lm, n_prompt, max_tokens, step_size)
        kv = parts["kv_cache"] + draft_parts["kv_cache"]
        need = kv + max(need - parts["kv_cache"], draft_need - draft_parts["kv_cache"])
        parts = {**parts, "kv_cache": kv, "draft": draft_need}
    return need, parts


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

"""Request params -> mlx-lm sampler and logits processors."""

from __future__ import annotations

from typing import Callable, List

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from . import protocol
from .errors import invalid_params

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def validate(params: protocol.GenerateParams, vocab_size: int) -> None:
    """Range checks msgspec's types can't express; each names its field."""
    checks = [
        ("max_tokens", params.max_tokens >= 0, "must be >= 0"),
        ("temperature", params.temperature >= 0, "must be >= 0"),
        ("top_p", 0 < params.top_p <= 1, "must be in (0, 1]"),
        ("top_k", 0 <= params.top_k < vocab_size, f"must be in [0, {vocab_size}) (0: off)"),
        ("min_p", 0 <= params.min_p <= 1, "must be in [0, 1]"),
        ("repetition_penalty", params.repetition_penalty > 0, "must be > 0"),
        ("repetition_context_size", params.repetition_context_size >= 1, "must be >= 1"),
        ("top_logprobs", 0 <= params.top_logprobs <= 20, "must be in [0, 20]"),
        ("prefill_step_size", params.prefill_step_size is None or params.prefill_step_size >= 1, "must be >= 1"),
        ("seed", params.seed is None or 0 <= params.seed < 2**64, "must be in [0, 2^64)"),
    ]
    for name, ok, why in checks:
        if not ok:
            raise invalid_params(f"params.{name}", f"{name} {why}")
    for key in params.logit_bias:
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab_size:
            raise invalid_params(
                f"params.logit_bias.{key}", f"logit_bias key {key!r} is not a token id in [0, {vocab_size})"
            )
    for i, token in enumerate(params.stop_token_ids):
        if not 0 <= token < vocab_size:
            raise invalid_params(f"params.stop_token_ids[{i}]", f"token id {token} is outside the vocabulary")
    stops = [params.stop] if isinstance(params.stop, str) else params.stop
    for i, s in enumerate(stops):
        if not s:
            raise invalid_params(f"params.stop[{i}]", "stop strings must not be empty")


def stop_strings(params: protocol.GenerateParams) -> list[str]:
    return [params.stop] if isinstance(params.stop, str) else list(params.stop)


def make(params: protocol.GenerateParams):
    sampler = make_sampler(
        temp=params.temperature,
        top_p=params.top_p if params.top_p < 1.0 else 0.0,
        min_p=params.min_p,
        top_k=params.top_k,
    )
    processors: List[LogitsProcessor] = make_logits_processors(
        logit_bias={int(k): v for k, v in params.logit_bias.items()} or None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        repetition_context_size=params.repetition_context_size,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=params.repetition_context_size,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=params.repetition_context_size,
    )
    return sampler, processors


def with_prefix(processors: List[LogitsProcessor], prefix: list[int]) -> List[LogitsProcessor]:
    """Make processors see the whole context although only the uncached
    suffix of the prompt is fed to generate_step, so a cached run penalizes
    exactly what an uncached run does."""
    if not prefix or not processors:
        return processors
    head = mx.array(prefix)

    def wrap(p: LogitsProcessor) -> LogitsProcessor:
        return lambda tokens, logits: p(mx.concatenate([head.astype(tokens.dtype), tokens]), logits)

    return [wrap(p) for p in processors]

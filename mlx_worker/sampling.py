"""Request params -> mlx-lm sampler and logits processors (Spec: protocol/README.md § `generate`, § XTC and DRY)."""

from __future__ import annotations

from typing import Callable, List, Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from . import dry, protocol
from .errors import invalid_params

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def validate(params: protocol.GenerateParams, vocab_size: int) -> None:
    """What depends on the model (the vocabulary); every other bound is in
    the params' types (protocol.py)."""
    if params.top_k >= vocab_size:
        raise invalid_params("params.top_k", f"top_k must be in [0, {vocab_size}) (0: off)")
    # msgspec decodes JSON integers past 2^64 - 1 too, and Meta bounds stop at int64.
    if params.seed is not None and params.seed >= 2**64:
        raise invalid_params("params.seed", "seed must be in [0, 2^64)")
    for key in params.logit_bias:
        if int(key) >= vocab_size:  # the key is ASCII digits (protocol.TokenIdKey)
            raise invalid_params(
                f"params.logit_bias.{key}", f"logit_bias key {key!r} is not a token id in [0, {vocab_size})"
            )
    for i, token in enumerate(params.stop_token_ids):
        if token >= vocab_size:
            raise invalid_params(f"params.stop_token_ids[{i}]", f"token id {token} is outside the vocabulary")


def stop_strings(params: protocol.GenerateParams) -> list[str]:
    return [params.stop] if isinstance(params.stop, str) else list(params.stop)


# top_p meets float32 probabilities (mlx-lm sums them in float32), and
# 1/temperature meets the logprobs in their own dtype (float16 at worst): past
# these, the product rounds to 0 or overflows.
_F32_TINY = 1.1754943508222875e-38  # the smallest positive normal float32
_F16_MAX = 65504.0


def make(params: protocol.GenerateParams, lm=None):
    """(sampler, logits processors) for a request; ``lm`` (the loaded model)
    gives XTC its protected tokens and DRY its vocabulary."""
    top_p = params.top_p
    if top_p < 1.0:
        # top_p x mass rounding to 0 would drop every token (uniform sampling);
        # at the smallest float32 only the most likely token is left: greedy.
        top_p = max(top_p, _F32_TINY)
    temperature = params.temperature
    if temperature and 1.0 / temperature > _F16_MAX:
        # logprobs / temperature overflows (in float16 first): the limit is greedy.
        temperature = 0.0
    xtc = None
    if params.xtc_probability > 0.0 and lm is not None:
        xtc = _xtc(params.xtc_probability, params.xtc_threshold, xtc_protected(lm))
    sampler = _sampler(temperature, top_p if top_p < 1.0 else 0.0, params.min_p, params.top_k, xtc)
    processors: List[LogitsProcessor] = make_logits_processors(
        logit_bias={int(k): v for k, v in params.logit_bias.items()} or None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        repetition_context_size=params.repetition_context_size,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=params.repetition_context_size,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=params.repetition_context_size,
    )
    if params.dry_multiplier > 0.0 and params.dry_penalty_last_n != 0 and lm is not None:
        processors.append(dry.processor(
            params.dry_multiplier, params.dry_base, params.dry_allowed_length, params.dry_penalty_last_n,
            dry.breakers_for(lm, params.dry_sequence_breakers), lm.context_length))
    if processors:
        processors.append(keep_finite)
    return sampler, processors


Sampler = Callable[[mx.array, Optional[mx.array]], mx.array]


def _sampler(temp: float, top_p: float, min_p: float, top_k: int, xtc=None) -> Sampler:
    """mlx-lm's sampler chain (its own filters, same order as make_sampler),
    drawing from the request's own PRNG key instead of MLX's global one.
    XTC's coin comes from that key too (split off only when XTC is on, so
    every other request samples exactly as before)."""
    if temp == 0:
        return lambda logprobs, key: mx.argmax(logprobs, axis=-1)
    methods = []
    if 0 < top_p < 1.0:
        methods.append(lambda x: apply_top_p(x, top_p))
    if min_p != 0.0:
        methods.append(lambda x: apply_min_p(x, min_p, 1))
    if top_k > 0:
        top_k_method = lambda x: apply_top_k(x, top_k)  # noqa: E731
    inv_temp = 1 / temp

    def sample(logprobs: mx.array, key: Optional[mx.array]) -> mx.array:
        for method in methods:
            logprobs = method(logprobs)
        if xtc is not None:
            coin, key = mx.random.split(key)
            logprobs = xtc(logprobs, coin)
        if top_k > 0:
            logprobs = top_k_method(logprobs)
        return mx.random.categorical(logprobs * inv_temp, key=key)

    return sample


def xtc_protected(lm) -> list[int]:
    """Tokens XTC never removes: EOS and the newline, as mlx_lm.server has it."""
    try:
        newline = set(lm.hf_tokenizer.encode("\n", add_special_tokens=False))
    except Exception:  # a tokenizer without that call: EOS alone
        newline = set()
    return sorted(t for t in newline | set(lm.eos_token_ids) if 0 <= t < lm.vocab_size)


def _xtc(probability: float, threshold: float, protected: list[int]):
    """XTC ("exclude top choices"), llama.cpp's rule: with ``probability``,
    every token at or above ``threshold`` except the least likely of them
    is removed (nothing when fewer than two reach it)."""
    keep = mx.array(protected, dtype=mx.int32) if protected else None

    def apply(logprobs: mx.array, coin: mx.array) -> mx.array:
        probs = mx.softmax(logprobs, axis=-1)  # over what top_p / min_p left
        above = probs >= threshold
        floor = mx.where(above, probs, mx.inf).min(axis=-1, keepdims=True)
        drop = probs > floor
        if keep is not None:
            drop[..., keep] = False
        drop = mx.logical_and(drop, mx.random.uniform(key=coin) <= probability)
        return mx.where(drop, -mx.inf, logprobs)

    return apply


def request_key(seed: int) -> mx.array:
    """A request's own PRNG key: its samples depend on its seed and on how
    many tokens it sampled before, never on other requests."""
    return mx.random.key(seed)


def split_key(key: mx.array) -> tuple[mx.array, mx.array]:
    """(the key for the next token, the key for this one)."""
    pair = mx.random.split(key)
    return pair[0], pair[1]


def keep_finite(tokens: mx.array, logits: mx.array) -> mx.array:
    """Clamp, in the logits' own dtype, what a bias or penalty pushed past its
    range: +inf becomes the largest finite value (the token stays the most
    likely), NaN (0/0 from a penalty that rounded to 0) the lowest finite
    value; -inf stays -inf (a banned or masked token). So the logprobs
    derived from the logits stay numbers."""
    if not mx.issubdtype(logits.dtype, mx.floating):
        return logits
    info = mx.finfo(logits.dtype)
    return mx.nan_to_num(logits, nan=float(info.min), posinf=float(info.max), neginf=-float("inf"))


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

"""DRY ("don't repeat yourself"): llama.cpp's penalty on the token that would
extend a sequence already seen in the context.

A token that would make the context's suffix repeat an earlier sequence of
``n >= allowed_length`` tokens loses ``multiplier * base ** (n -
allowed_length)`` from its logit; sequence breakers cut how far back a repeat
may reach. Follows llama.cpp's ``llama_sampler_dry``. Spec: protocol/README.md § XTC and DRY.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import mlx.core as mx

# llama.cpp's limits: a breaker's length in characters, and the tokens of a
# breaker's tail that are matched.
MAX_BREAKER_CHARS = 40
MAX_TAIL_TOKENS = 20
_FLOAT_MAX_LOG = 88.7228391  # log of float32's largest value
_BREAKER_SETS_KEPT = 16  # per model

# breaker head token -> the tails (token tuples) that complete a breaker after it
Breakers = dict[int, list[tuple[int, ...]]]

# Per loaded model: every token's text, and breaker sets -> Breakers.
_TOKEN_TEXTS: "weakref.WeakKeyDictionary[object, list[str]]" = weakref.WeakKeyDictionary()
_BREAKERS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def token_texts(lm) -> list[str]:
    """Every token id's own text (special tokens included), once per model."""
    texts = _TOKEN_TEXTS.get(lm)
    if texts is None:
        try:
            texts = lm.hf_tokenizer.batch_decode([[i] for i in range(lm.vocab_size)], skip_special_tokens=False,
                                                 clean_up_tokenization_spaces=False)
        except Exception:  # a tokenizer without batch_decode (a processor): one id at a time
            texts = [lm.decode([i]) for i in range(lm.vocab_size)]
        _TOKEN_TEXTS[lm] = texts
    return texts


def breakers_for(lm, strings: list[str]) -> Breakers:
    """The token sequences that spell (or end in the start of) each breaker,
    as llama.cpp's ``get_overlapping_token_sequences`` finds them; kept per
    model and breaker set."""
    key = tuple(strings)
    table = _BREAKERS.setdefault(lm, {})
    if key in table:
        return table[key]
    texts = token_texts(lm)
    out: Breakers = {}
    for s in strings:
        s = s[:MAX_BREAKER_CHARS]
        for token, word in enumerate(texts):
            if s in word:
                _add(out, token, ())
                continue
            # The word ends with a prefix of the breaker: the rest of the
            # breaker, tokenized, must follow for the breaker to be complete.
            pos = word.find(s[0])
            while pos != -1:
                tail = word[pos:]
                if s.startswith(tail):
                    rest = lm.hf_tokenizer.encode(s[len(tail):], add_special_tokens=False)[:MAX_TAIL_TOKENS]
                    _add(out, token, tuple(rest))
                pos = word.find(s[0], pos + 1)
    if len(table) >= _BREAKER_SETS_KEPT:
        table.pop(next(iter(table)))
    table[key] = out
    return out


def _add(out: Breakers, token: int, tail: tuple[int, ...]) -> None:
    tails = out.setdefault(token, [])
    if tail not in tails:
        tails.append(tail)


def penalties(context: list[int], multiplier: float, base: float, allowed_length: int,
              breakers: Breakers) -> dict[int, float]:
    """Token id -> what DRY subtracts from its logit, given the context
    (already cut to the penalty window)."""
    n = len(context)
    if multiplier == 0.0 or base < 1.0 or n <= allowed_length:
        return {}
    rev = context[::-1]  # rev[0]: the most recent token

    # Step 1: the nearest breaker limits how long a repeat may be.
    rep_limit = n
    for i in range(n):
        tails = breakers.get(rev[i])
        if tails is None:
            continue
        longest = -1
        for tail in tails:
            m = len(tail)
            if longest < m <= i and all(tail[j] == rev[i - j - 1] for j in range(m)):
                longest = m
        if longest >= 0:
            rep_limit = i - longest
            break
    if rep_limit < allowed_length:
        return {}

    # Step 2: z[k] = how many of the latest tokens also end k tokens earlier
    # (the Z-algorithm on the reversed context).
    z = _z_array(rev)

    # Step 3: the token after each such earlier occurrence would extend the repeat.
    longest_repeat: dict[int, int] = {}
    for k in range(1, n):
        length = min(z[k], rep_limit)
        if length >= allowed_length:
            token = rev[k - 1]
            if longest_repeat.get(token, -1) < length:
                longest_repeat[token] = length

    # Step 4: the penalty, except on single-token breakers.
    max_exponent = int(_FLOAT_MAX_LOG / math.log(base)) if base > 1.000001 else 0
    out = {}
    for token, length in longest_repeat.items():
        if () in breakers.get(token, ()):
            continue
        exponent = length - allowed_length
        if max_exponent > 0 and exponent > max_exponent:
            exponent = max_exponent
        out[token] = multiplier * base ** exponent
    return out


def _z_array(s: list[int]) -> list[int]:
    n = len(s)
    z = [0] * n
    lt = rt = 0
    for k in range(1, n):
        if k < rt:
            z[k] = min(rt - k, z[k - lt])
        while k + z[k] < n and s[z[k]] == s[k + z[k]]:
            z[k] += 1
        if k + z[k] > rt:
            lt, rt = k, k + z[k]
    return z


def processor(multiplier: float, base: float, allowed_length: int, penalty_last_n: int,
              breakers: Breakers, context_length: Optional[int]):
    """A logits processor over the whole context the request sees (prompt
    and generated tokens); ``penalty_last_n`` -1 means the model's context."""
    window = penalty_last_n if penalty_last_n >= 0 else context_length

    def dry(tokens: mx.array, logits: mx.array) -> mx.array:
        context = tokens.tolist()
        if window is not None:
            context = context[max(0, len(context) - window):]
        pen = penalties(context, multiplier, base, allowed_length, breakers)
        if not pen:
            return logits
        ids = mx.array(list(pen.keys()))
        values = mx.array(list(pen.values()), dtype=logits.dtype)
        return logits.at[:, ids].subtract(values)

    return dry

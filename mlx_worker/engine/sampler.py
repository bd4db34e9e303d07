"""One request's sampling: its logits processors over its own history, then
its sampler with its own PRNG key chain.

The key is split once per sampled token, so with the same seed a request's
tokens are the same alone, in any batch, or verified in speculative rounds
(output position p always gets the p-th key; see the spec's "Batching").
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx

from .. import faults, sampling


class RowSampler:
    def __init__(self, sample_fn: Callable, processors: list, key: Optional[mx.array], history: list[int]):
        self.sample_fn = sample_fn
        self.processors = processors  # they see the cached prefix too (sampling.with_prefix)
        self.key = key  # None: greedy (temperature 0)
        self.history = mx.array(history, dtype=mx.uint32)  # what the processors see after their prefix
        self._keys: list[mx.array] = []  # speculative: keys by output position

    def row(self, logits: mx.array, fed: mx.array) -> tuple[mx.array, mx.array]:
        """The next token from this request's row of logits (1, vocab);
        ``fed`` is the token the step fed (lazy). Returns (token (1,), logprobs (vocab,))."""
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

    def at(self, logprobs: mx.array, position: int) -> mx.array:
        """Speculative rounds: the token at output ``position`` with the key a
        draftless run uses there (draft and verify may ask for it again)."""
        if self.key is None and not self._keys:
            return self.sample_fn(logprobs, None)
        while len(self._keys) <= position:
            self.key, sub = sampling.split_key(self.key)
            self._keys.append(sub)
        return self.sample_fn(logprobs, self._keys[position])

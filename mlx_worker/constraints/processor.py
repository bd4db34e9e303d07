"""The constraint as an mlx-lm logits processor: ``processor(tokens, logits)``.

The first call sees the whole prompt (not fed to the matcher); each later one
consumes the token sampled last, then masks the next. Draft tokens are rolled
back to what each call shows; EOS is allowed exactly when the matcher accepts.
Anything unexpected raises -32007, never unconstrained output.
Spec: protocol/README.md § Constrained generation; why calls run one step ahead:
bench/results/design-notes.md § layers.
"""

from __future__ import annotations

import numpy as np

import mlx.core as mx

from .. import errors
from ..errors import WorkerError
from . import mask
from .common import is_engine_panic

TAKEN = "taken"  # batch_masks took this step's token; the call fills the mask
WORDS = "words"  # batch_masks filled this step's mask; the call applies it
APPLIED = "applied"  # batch_masks applied this step's mask to the batch's logits


class MatcherProcessor:
    """What every matcher-driven processor shares (this one and the lazy
    tool-call processor): the bitmask buffer, one mask step, and failing
    closed with -32007."""

    what = "constrained generation"
    field = "params.constraint"

    def __init__(self, info):
        self.words = np.zeros(info.mask_words, dtype=np.int32)
        self._ptr, self._nbytes = self.words.ctypes.data, self.words.nbytes
        self.vocab = info.logits_vocab
        self.eos = info.eos_ids

    @property
    def generated(self) -> int:
        raise NotImplementedError

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        try:
            return self._step(tokens, logits)
        except BaseException as exc:
            if is_engine_panic(exc):
                raise self._failure(f"the matcher failed: {exc}") from None
            raise

    def _step(self, tokens: mx.array, logits: mx.array) -> mx.array:
        raise NotImplementedError

    def _fill(self, matcher, eos_allowed: bool) -> None:
        """``self.words`` := the tokens ``matcher`` allows next, EOS set to
        ``eos_allowed``."""
        if not matcher.fill(self._ptr, self._nbytes):
            raise self._failure(matcher.error())
        mask.set_bits(self.words, self.eos, eos_allowed)

    def _allowed(self, why_empty: str) -> np.ndarray:
        allowed = mask.unpack(self.words, self.vocab)
        if not allowed.any():
            raise self._failure(why_empty)
        return allowed

    def _kept(self, exc: BaseException) -> BaseException:
        """A batched step's failure, for the call to raise (this row only)."""
        return self._failure(f"the matcher failed: {exc}") if is_engine_panic(exc) else exc

    def _failure(self, why: str) -> WorkerError:
        return WorkerError(
            errors.CONSTRAINT_INVALID,
            f"{self.what} stopped after {self.generated} tokens: {why}",
            {"field": self.field, "phase": "generation", "completion_tokens": self.generated},
        )


class ConstraintProcessor(MatcherProcessor):
    def __init__(self, matcher, info):
        super().__init__(info)
        self.m = matcher
        self._last_words = np.zeros_like(self.words)
        self._last_allowed = None
        self.seen = -1  # len(tokens) at the last call; -1 before the first
        self.prompt_len = 0
        self._fed = np.zeros(64, dtype=np.int64)  # the generated tokens given to the matcher (EOS too)
        self._nfed = 0
        self._matched = 0  # of them, given to the matcher (the rest: EOS once complete)
        self.finished = False  # an EOS was consumed in an accepting state
        self.ready = None  # this step's work done by batch_masks.py: WORDS, APPLIED, or its failure
        eos_only = np.zeros(self.vocab, dtype=np.bool_)
        eos_only[[e for e in self.eos if e < self.vocab]] = True
        self._eos_only = eos_only
        self._eos_only_mx = None

    @property
    def generated(self) -> int:
        return max(0, self.seen - self.prompt_len)

    def _step(self, tokens: mx.array, logits: mx.array) -> mx.array:
        ready, self.ready = self.ready, None
        if isinstance(ready, BaseException):
            raise ready
        mx.async_eval(tokens)
        mx.async_eval(logits)
        n = tokens.shape[-1]
        if self.seen < 0:
            self.seen = self.prompt_len = n
        elif ready is None or n != self.seen:
            ready = None  # (a batched step always shows one token more: never out of step)
            self._advance(np.asarray(tokens), n)
        if ready is APPLIED:
            return logits  # the batch masked this row of its logits
        if self.finished:
            return mask.apply(logits, self._eos_only)
        if ready is None:
            self._fill(self.m, self.m.accepting())
        return mx.where(self._device_allowed(), logits, mask.NEG_INF)

    def _device_allowed(self) -> mx.array:
        """The tokens ``self.words`` allows, as an array on the device."""
        if self._last_allowed is not None and np.array_equal(self.words, self._last_words):
            # Same mask as the last step (the inside of a long string, free
            # text in a grammar): reuse the array already on the device.
            return self._last_allowed
        allowed = self._allowed("the constraint allows no token here")
        self._last_words[:] = self.words
        self._last_allowed = mx.array(allowed)
        return self._last_allowed

    # ---------------------------------------------- batched (batch_masks.py)

    def batch_take(self, token: int) -> bool:
        """A batched step, before the call: consume ``token`` (the one this
        step feeds; the first call sees only the prompt) as the call would.
        True when this step wants the matcher's mask; a failure is kept for
        the call to raise."""
        try:
            if self.seen >= 0:
                self.seen += 1
                self._take(token)
        except BaseException as exc:
            self.ready = self._kept(exc)
            return False
        return not self.finished

    def batch_words(self, words: np.ndarray) -> None:
        """The batch filled the mask into ``words``: checked and taken as
        ``_fill`` would (the call then applies it: WORDS)."""
        self.words[:] = words
        self.ready = WORDS
        if self.m.failed():
            self.ready = self._failure(self.m.error())
        else:
            mask.set_bits(self.words, self.eos, self.m.accepting())

    def batch_allowed(self) -> mx.array | None:
        """The allowed tokens of this step (after ``batch_words``, or EOS only
        once finished) on the device, for the batch to apply itself (the
        call then passes the logits through: APPLIED); None if the step
        failed (kept)."""
        if isinstance(self.ready, BaseException):
            return None
        try:
            allowed = self._eos_only_array() if self.finished else self._device_allowed()
        except WorkerError as exc:
            self.ready = exc
            return None
        self.ready = APPLIED
        return allowed

    def batch_undo(self) -> None:
        """The batch failed: the call redoes the step (the token taken is
        kept consistently: it finds nothing new to consume)."""
        if self.ready in (WORDS, APPLIED):
            self.ready = None

    def _eos_only_array(self) -> mx.array:
        if self._eos_only_mx is None:
            self._eos_only_mx = mx.array(self._eos_only)
        return self._eos_only_mx

    def _advance(self, tokens: np.ndarray, n: int) -> None:
        """Bring the matcher to exactly ``tokens[prompt_len:n]``: roll back
        what it consumed past their common prefix, consume the rest.
        Speculative decoding calls with draft tokens, then shows the verified
        context again (shorter, or the same length with other tokens): a
        token the call no longer shows never stays in the matcher."""
        now = tokens[self.prompt_len : n]
        fed = self._fed[: self._nfed]
        keep = min(len(fed), len(now))
        differ = np.flatnonzero(fed[:keep] != now[:keep])
        if differ.size:
            keep = int(differ[0])
        if keep < self._nfed:
            if keep < self._matched:
                self.m.rollback(self._matched - keep)
                self._matched = keep
            self._nfed = keep
            self.finished = keep > self._matched  # an EOS is still shown
        self.seen = n
        for token in now[keep:].tolist():
            self._take(token)

    def _take(self, token: int) -> None:
        self._remember(token)
        if self.finished:
            # Drafting runs on past an EOS under the EOS-only mask; in the
            # output nothing follows it.
            if token in self.eos:
                return
            raise self._failure(f"token {token} after the constraint was complete")
        if token in self.eos:
            if not self.m.accepting():
                raise self._failure(f"EOS token {token} before the constraint was complete")
            self.finished = True
        elif not self.m.consume(token):
            raise self._failure(f"token {token} was refused: {self.m.error()}")
        else:
            self._matched += 1

    def _remember(self, token: int) -> None:
        if self._nfed == len(self._fed):
            self._fed = np.concatenate([self._fed, np.zeros(max(64, len(self._fed)), dtype=self._fed.dtype)])
        self._fed[self._nfed] = token
        self._nfed += 1

"""Speculative rounds whose draft length follows the acceptance a request sees.

mlx-lm's ``speculative_generate_step`` with a draft length chosen each round
(``DraftLength``), down to none: a plain decode step of the target, while the
draft skips the tokens (fed to it in one call when it drafts again or the
request ends). A round: the draft proposes k tokens, the target verifies them
in one pass, the agreeing prefix plus the target's next token are emitted.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import trim_prompt_cache

from . import runner

# While drafting does not pay, this many tokens are decoded without a draft
# before a draft of one is tried again; the pause doubles while the tries
# keep failing.
FIRST_PAUSE = 16
MAX_PAUSE = 256
CATCH_UP_STEP = 512  # tokens per call when the draft catches up
# A verify pass over k + 1 tokens costs about 1 + VERIFY_COST * k target
# steps (more rows through the same weights).
VERIFY_COST = 0.05
DECAY = 0.7  # weight of the previous rounds in the acceptance estimate
MIN_GAIN = 1.03  # drafting must beat plain decoding by this much


class DraftLength:
    """How many tokens the next round drafts, from the acceptance seen so
    far: each draft token is accepted with an estimated probability ``a``
    (accepted / (accepted + rejections), older rounds decaying), so k drafts
    emit (1 - a^(k+1)) / (1 - a) tokens per round at a cost of about
    1 + ``cost`` * k target steps (``cost``: a draft step plus a verified
    row, relative to a target step). The best k is drafted, up to ``max_n``;
    when no k beats plain decoding, the next ``pause`` tokens are plain, then
    a draft of one probes again."""

    def __init__(self, max_n: int, adaptive: bool = True, cost: float = 0.1):
        self.max_n = max_n
        self.adaptive = adaptive
        self.cost = max(cost, 1e-3)
        self.accepted = 1.0  # optimistic start: the first round drafts the most
        self.rejected = 0.0
        self.n = max_n
        self.paused = 0  # plain steps to take before the next probe
        self.pause = FIRST_PAUSE
        self.probing = False

    def next(self) -> int:
        """Tokens to draft next (1 for a probe after a pause)."""
        return 1 if self.probing else self.n

    def plain(self) -> int:
        """Plain steps to take now, in one run (then a probe)."""
        steps, self.paused = self.paused, 0
        if steps:
            self.probing = True
        return steps

    def gain(self, k: int) -> float:
        a = self.accepted / (self.accepted + self.rejected) if self.accepted + self.rejected else 1.0
        emitted = k + 1 if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)
        return emitted / (1 + self.cost * k)

    def update(self, proposed: int, accepted: int) -> None:
        if not self.adaptive or proposed == 0:
            return
        self.accepted = self.accepted * DECAY + accepted
        self.rejected = self.rejected * DECAY + (1 if accepted < proposed else 0)
        best = max(range(1, self.max_n + 1), key=self.gain)
        was_probe, self.probing = self.probing, False
        if self.gain(best) >= MIN_GAIN:
            self.n = best
            self.pause = FIRST_PAUSE
            return
        if was_probe and accepted == 0:
            self.pause = min(MAX_PAUSE, self.pause * 2)
        self.paused = self.pause


class Rounds:
    """One request's speculative rounds. ``tokens()`` yields (token,
    logprobs, from_draft); ``sample(logprobs (1, V), position)`` is the
    request's keyed sampler; ``processors`` see ``context + tokens``."""

    def __init__(self, model, draft_model, cache: list, n_target: int, first: int, *,
                 length: DraftLength, max_tokens: int, start: int,
                 sample: Callable[[mx.array, int], mx.array], processors: Optional[list]):
        self.model = model
        self.draft_model = draft_model
        self.model_cache = cache[:n_target]
        self.draft_cache = cache[n_target:]
        self.length = length
        self.max_tokens = max_tokens
        self.start = start  # output position of the first token emitted here
        self.sample = sample
        self.processors = processors or []
        self.context = mx.array([first], mx.uint32)  # what the processors see (after their prefix)
        self.y = first  # the token the target reads next
        self.lagging = [first]  # tokens the draft has not read yet; the last is always self.y
        self.rounds = [0] * (length.max_n + 1)  # rounds per draft length
        self.proposed = 0
        self.accepted = 0

    def _pick(self, logits: mx.array, drafted: list, position: int) -> tuple[mx.array, mx.array]:
        if self.processors:
            context = mx.concatenate([self.context, *drafted]) if drafted else self.context
            for p in self.processors:
                logits = p(context, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return self.sample(logprobs, position), logprobs

    def _draft(self, k: int, position: int) -> list:
        drafted: list = []
        y = mx.array(self.lagging, mx.uint32)
        for j in range(k):
            logits = runner.forward(self.draft_model, y, self.draft_cache)[:, -1, :]
            y, _ = self._pick(logits, drafted, position + j)
            mx.async_eval(y)
            drafted.append(y)
        return drafted

    def _plain(self, steps: int, position: int) -> Iterator[tuple[int, mx.array, bool]]:
        """``steps`` target steps without a draft, each one's graph built
        before the previous token is read (as mlx-lm's generate_step does),
        so they cost what plain decoding costs. A stop inside the run leaves
        one token too many in the target's cache; the caller's end trims it."""

        def step(y: mx.array, i: int):
            logits = runner.forward(self.model, y, self.model_cache)[:, -1, :]
            token, logprobs = self._pick(logits, [], position + i)
            self.context = mx.concatenate([self.context, token.astype(mx.uint32)])
            return token, logprobs

        token, logprobs = step(mx.array([self.y], mx.uint32), 0)
        mx.async_eval(token, logprobs)
        for i in range(steps):
            if i + 1 < steps:
                following = step(token.astype(mx.uint32), i + 1)
                mx.async_eval(*following)
            value = int(token.item())
            self.rounds[0] += 1
            self.lagging.append(value)
            self.y = value
            yield value, logprobs[0], False
            if i + 1 < steps:
                token, logprobs = following

    def tokens(self) -> Iterator[tuple[int, mx.array, bool]]:
        emitted = 0
        with mx.stream(generation_stream):
            while emitted < self.max_tokens:
                position = self.start + emitted
                steps = min(self.length.plain(), self.max_tokens - emitted)
                if steps > 0:
                    for item in self._plain(steps, position):
                        emitted += 1
                        yield item
                    continue
                k = min(self.length.next(), self.max_tokens - emitted - 1)
                drafted = self._draft(k, position) if k > 0 else []
                inputs = mx.concatenate([mx.array([self.y], mx.uint32), *drafted]) if drafted else \
                    mx.array([self.y], mx.uint32)
                logits = runner.forward(self.model, inputs, self.model_cache)  # verify: y and the drafts
                picked = [self._pick(logits[:, i, :], drafted[:i], position + i) for i in range(k + 1)]
                targets = mx.concatenate([t for t, _ in picked])
                mx.eval(targets, *drafted)
                targets = targets.tolist()
                proposals = [int(d.item()) for d in drafted]
                n = 0
                while n < k and targets[n] == proposals[n]:
                    n += 1
                self.rounds[k] += 1
                self.proposed += k
                self.length.update(k, n)
                kept = proposals[:n] + [targets[n]]
                # Caches back to what was kept: the target read y and the k
                # drafts (keeps y and the n accepted); the draft read its lag
                # and k - 1 drafts.
                trim_prompt_cache(self.model_cache, k - n)
                if k > 0:
                    trim_prompt_cache(self.draft_cache, max(k - 1 - n, 0))
                    self.lagging = [proposals[-1], targets[n]] if n == k else [targets[n]]
                else:
                    self.lagging.append(targets[n])
                self.y = targets[n]
                self.context = mx.concatenate([self.context, mx.array(kept, mx.uint32)])
                for i, token in enumerate(kept):
                    emitted += 1
                    self.accepted += i < n  # counted as read: a stop ends the round early
                    yield token, picked[i][1][0], i < n

    def catch_up(self) -> None:
        """Feed the draft what it skipped (all but the token the target
        reads next), so both caches hold the same tokens."""
        behind = self.lagging[:-1]
        with mx.stream(generation_stream):
            for i in range(0, len(behind), CATCH_UP_STEP):
                runner.forward(self.draft_model, mx.array(behind[i : i + CATCH_UP_STEP], mx.uint32), self.draft_cache)
                mx.eval([c.state for c in self.draft_cache])
        self.lagging = self.lagging[-1:]

"""Speculative decoding: a draft model proposes tokens, the target verifies them.

The rounds (draft, verify, rewind) are mlx-lm's ``speculative_generate_step``
with a draft length that follows the acceptance (draft_rounds.py); this
module fits them into the worker's request lifecycle:

- Prefill: the worker's own chunk loop runs both models (``Draft.prefill``)
  so progress events and cancel between chunks work as without a draft;
  the engine starts from the prompt's last token.
- Cache: one list, target layers then draft layers (mlx-lm's layout), leased
  from a prompt-cache store of the (target, draft) pair. At the end both
  halves are cut to the same length: the tokens actually emitted (the draft
  first reads what it skipped while the rounds drafted nothing).
- Sampling: the target's token at output position p is drawn with the key a
  draftless run uses at p (the request's key chain), its processors see the
  same context; mlx-lm emits the target's token at every position, so the
  output equals the draftless run's (up to the rounding of verifying several
  positions in one forward pass), whatever the draft length. The draft samples position p with the same
  key, which keeps acceptance high under sampling too.
- Constraints: the processor is applied to draft and verify logits; the
  matcher follows the ``tokens`` each call shows (rolled back to them), so a
  rejected draft token never stays in it.

What can't be exact is refused: windowed (rotating) or untrimmable caches
(mlx-lm's trim silently does nothing once a window wraps), vision input, a
lazy tool-call grammar (it follows the tokens it is told of, not a rewind),
and a draft whose vocabulary differs from the target's.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.models.cache import trim_prompt_cache

from ..cache import store as prompt_cache
from . import draft_rounds
from .draft_pairs import check_pair, find, forget, new_cache, pair_store, pair_stores  # noqa: F401
from .. import errors, sampling
from ..models.loaded import LoadedModel

DEFAULT_NUM_DRAFT_TOKENS = 3  # mlx_lm.server's default


def resolve(get: Callable[[str], LoadedModel], lm: LoadedModel, params) -> tuple[Optional[LoadedModel], int]:
    """The draft a generate asks for (or its model's load default) and how
    many tokens it drafts per step; (None, 0) without one."""
    draft_id = params.draft_model_id
    num = params.num_draft_tokens
    field = "params.draft_model_id"
    if draft_id is None:
        draft_id = lm.load_options.get("draft_model_id")
        if num is None:
            num = lm.load_options.get("num_draft_tokens")
    if draft_id is None:
        if params.num_draft_tokens:
            raise errors.invalid_params("params.num_draft_tokens", "num_draft_tokens needs a draft_model_id")
        return None, 0
    if num == 0:
        return None, 0
    return find(get, draft_id, field), num or DEFAULT_NUM_DRAFT_TOKENS


class Draft:
    """A request's draft: the model, its share of the cache, the counts."""

    def __init__(self, lm: LoadedModel, draft: LoadedModel, num: int):
        self.target = lm
        self.lm = draft
        self.num = num
        self.n_target = len(lm.model.layers)
        self.rounds: Optional[draft_rounds.Rounds] = None  # set when decoding starts
        self.uncounted = 0  # accepted drafts that were not output (an EOS)

    @property
    def proposed(self) -> int:
        return self.rounds.proposed if self.rounds is not None else 0

    @property
    def accepted(self) -> int:
        return self.rounds.accepted - self.uncounted if self.rounds is not None else 0

    @property
    def step_cost(self) -> float:
        """A draft step plus one more verified row, in target steps: the
        models' weight bytes (what a decode step reads) in ratio."""
        return self.lm.memory_bytes / max(self.target.memory_bytes, 1) + draft_rounds.VERIFY_COST

    @property
    def lengths(self) -> list[int]:
        """Rounds per draft length (index 0: plain steps)."""
        return self.rounds.rounds if self.rounds is not None else [0] * (self.num + 1)

    @classmethod
    def for_request(cls, lm: LoadedModel, draft: LoadedModel, num: int, params, tool_processor) -> "Draft":
        field = "params.draft_model_id"
        check_pair(lm, draft, field)
        if getattr(tool_processor, "observe", None) is not None:  # a lazy grammar, told of tokens as read
            raise errors.invalid_params(
                field, "speculative decoding with tools under a tool-call grammar is not supported; "
                "send tool_choice \"none\" or no draft_model_id")
        return cls(lm, draft, num)

    @property
    def store(self):
        return pair_store(self.target, self.lm)

    def new_cache(self) -> list:
        return new_cache(self.target, self.lm)

    def prefill(self, tokens: mx.array, cache: list) -> None:
        """The same prompt tokens through both models."""
        self.target.model(tokens[None], cache=cache[: self.n_target])
        # one model's chunk at a time: their temporaries never add up (memory_model.py)
        mx.eval([c.state for c in cache[: self.n_target]])
        self.lm.model(tokens[None], cache=cache[self.n_target :])

    def group(self, gen) -> "SpeculativeGroup":
        return SpeculativeGroup(gen, self)


class _KeyedSampler:
    """The request's sampler with its own keys: output position p gets the
    key a draftless run uses at p."""

    def __init__(self, gen):
        self.gen = gen
        self.keys: list[mx.array] = []

    def _key(self, p: int) -> mx.array:
        gen = self.gen
        while len(self.keys) <= p:
            gen.key, sub = sampling.split_key(gen.key)
            self.keys.append(sub)
        return self.keys[p]

    def __call__(self, logprobs: mx.array, position: int) -> mx.array:
        gen = self.gen
        if gen.key is None and not self.keys:
            return gen.sample_fn(logprobs, None)
        return gen.sample_fn(logprobs, self._key(position))


class SpeculativeGroup:
    """One request decoding with a draft: a decode group of its own. Each
    step is one speculative round (draft, verify, the accepted tokens)."""

    batchable = False

    def __init__(self, gen, draft: Draft):
        self.gen = gen
        self.draft = draft
        self.rows = [gen]
        self._rounds: Optional[draft_rounds.Rounds] = None
        self._it = None

    def __len__(self) -> int:
        return len(self.rows)

    def _engine(self) -> draft_rounds.Rounds:
        gen, draft = self.gen, self.draft
        processors = sampling.with_prefix(gen.processors, gen.prompt.tokens[gen.cached : -1])
        last = gen.prompt.tokens[-1]
        return draft_rounds.Rounds(
            gen.lm.model, draft.lm.model, gen.cache, draft.n_target, last,
            length=draft_rounds.DraftLength(draft.num, adaptive=gen.params.draft_adaptive, cost=draft.step_cost),
            max_tokens=gen.max_tokens, start=len(gen.fed_back), sample=_KeyedSampler(gen),
            processors=processors or None,
        )

    def step(self) -> list:
        gen, draft = self.gen, self.draft
        try:
            if self._it is None:
                reason = gen.accept(0, None)  # the prompt's last token: fed by the first round
                if reason is not None:
                    return self._end(reason)
                self._rounds = self._engine()
                draft.rounds = self._rounds
                self._it = self._rounds.tokens()
            while True:
                try:
                    token, logprobs, from_draft = next(self._it)
                except StopIteration:
                    return self._end("max_tokens")
                reason = gen.accept(int(token), logprobs if gen.want_logprobs else None)
                if from_draft and reason == "eos":  # an EOS is not output: accepted counts output tokens
                    draft.uncounted += 1
                if reason is not None:
                    return self._end(reason)
                if not from_draft:
                    return []
        except BaseException as exc:
            self._close()
            self.rows = []
            return [(gen, exc, None)]

    def _close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None

    def _end(self, reason: str) -> list:
        """Both halves of the cache cut to the tokens emitted (all but the
        last sampled one, as a draftless run leaves it): when the cache is
        kept, the draft first reads what it skipped while not drafting."""
        gen, n = self.gen, self.draft.n_target
        cache = gen.cache
        self._close()
        keep = gen.n_prompt - 1 + len(gen.fed_back)
        if self._rounds is not None and gen.lease is not None:  # only a cache that is kept needs the draft's half
            self._rounds.catch_up()
        halves = (cache[:n], cache[n:])
        offsets = [prompt_cache.cache_offset(h) for h in halves]
        if gen.lease is not None:
            keep = min([keep] + offsets)
        for half, off in zip(halves, offsets):
            if off > keep:
                trim_prompt_cache(half, off - keep)
        mx.eval([c.state for c in cache])
        self.rows = []
        return [(gen, reason, cache)]

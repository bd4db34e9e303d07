"""Speculative decoding: a draft model proposes tokens, the target verifies them.

A runner variant: ``SpeculativeGroup`` decodes one request with mlx-lm's
rounds, whose draft length follows the acceptance (draft_rounds.py), after the
runner's prefill of both models; the pair's cache (target layers, then draft
layers) is leased from the pair's prompt-cache store. The output equals the
draftless run's; what can't be exact is refused (``check_pair``).
Spec: "Speculative decoding".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.models.cache import trim_prompt_cache

from ..cache import store as prompt_cache
from . import draft_rounds
from .draft_pairs import check_pair, find, new_cache, pair_store
from .. import errors, sampling
from ..models.loaded import LoadedModel

DEFAULT_NUM_DRAFT_TOKENS = 3  # mlx_lm.server's default


@dataclass(frozen=True)
class DraftChoice:
    """The draft a generate asked for and how many tokens it drafts per step."""

    lm: LoadedModel
    num: int

    def draft_for(self, target: LoadedModel, params, tool_processor) -> "Draft":
        """The request's Draft, once its plan knows its tool processor (refusals named)."""
        return Draft.for_request(target, self.lm, self.num, params, tool_processor)


def resolve(get: Callable[[str], LoadedModel], lm: LoadedModel, params) -> Optional[DraftChoice]:
    """The draft a generate asks for (or its model's load default); None without one."""
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
        return None
    if num == 0:
        return None
    return DraftChoice(find(get, draft_id, field), num or DEFAULT_NUM_DRAFT_TOKENS)


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

    def group(self, gen) -> "SpeculativeGroup":
        return SpeculativeGroup(gen, self)


class SpeculativeGroup:
    """One request decoding with a draft: a decode group of its own. Each
    step is one speculative round (draft, verify, the accepted tokens).

    The rounds (draft, verify, rewind) are mlx-lm's ``speculative_generate_step``
    with a draft length that follows the acceptance (draft_rounds.py); this
    module fits them into the worker's request lifecycle:

    - Prefill: the worker's own chunk loop runs both models (runner.prefill)
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

    batchable = False

    def __init__(self, gen, draft: Draft):
        gen.computed = True
        self.gen = gen
        self.draft = draft
        self.rows = [gen]
        self._rounds: Optional[draft_rounds.Rounds] = None
        self._it = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def cache(self) -> list:
        """Its request's KV (admission counts what each decode group holds)."""
        return self.gen.cache

    def _engine(self) -> draft_rounds.Rounds:
        gen, draft, plan = self.gen, self.draft, self.gen.plan
        processors = sampling.with_prefix(gen.sampler.processors, plan.prompt.tokens[gen.cached : -1])
        return draft_rounds.Rounds(
            gen.lm.model, draft.lm.model, gen.cache, draft.n_target, plan.prompt.tokens[-1],
            length=draft_rounds.DraftLength(draft.num, adaptive=gen.params.draft_adaptive, cost=draft.step_cost),
            max_tokens=plan.max_tokens, start=len(gen.decoder.sampled), sample=gen.sampler.at,
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
                reason = gen.accept(int(token), logprobs if gen.plan.want_logprobs else None)
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
        keep = gen.plan.n_prompt - 1 + len(gen.decoder.sampled)
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

"""Speculative decoding: a draft model proposes tokens, the target verifies them.

A runner variant: ``SpeculativeGroup`` decodes one request with mlx-lm's
rounds, whose draft length follows the acceptance (draft_rounds.py), after the
runner's prefill of both models; the pair's cache (target layers, then draft
layers) is leased from the pair's prompt-cache store. The output equals the
draftless run's; what can't be exact is refused (``check_pair``).
Spec: "Speculative decoding".
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache, trim_prompt_cache

from ..cache import disk as cache_disk, store as prompt_cache
from . import draft_rounds
from .. import errors, sampling
from ..errors import WorkerError
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


def find(get: Callable[[str], LoadedModel], draft_id: str, field: str) -> LoadedModel:
    try:
        return get(draft_id)
    except WorkerError as exc:
        # -32602 naming the field, also for a draft whose unload waits (the
        # target itself would be -32003): the spec's one code for a draft.
        state = "being unloaded" if isinstance(exc.data, dict) and exc.data.get("unloading") else "not loaded"
        raise errors.invalid_params(field, f"draft model {draft_id!r} is {state}") from None


def check_pair(lm: LoadedModel, draft: LoadedModel, field: str) -> None:
    """Refuse a draft that can't give exactly the target's output."""
    for which, m in (("model", lm), ("draft model", draft)):
        if m.vision is not None:
            raise errors.invalid_params(field, f"speculative decoding does not support vision models ({which} {m.model_id!r})")
        if m.max_kv_size:
            raise errors.invalid_params(
                field, f"speculative decoding needs trimmable caches; the {which} {m.model_id!r} was loaded with "
                "max_kv_size (a rotating window can't take back rejected draft tokens)")
        cache = prompt_cache.make_cache(m)
        if len(cache) != len(getattr(m.model, "layers", ())):  # mlx-lm splits the pair's cache by layer count
            raise errors.invalid_params(field, f"speculative decoding does not support the {which} {m.model_id!r} "
                                        "(its cache is not one entry per layer)")
        kinds = {type(c).__name__ for c in cache if type(c) not in (KVCache, QuantizedKVCache)}
        if kinds:
            raise errors.invalid_params(
                field, f"speculative decoding needs plain KV caches; the {which} {m.model_id!r} uses "
                f"{', '.join(sorted(kinds))} (sliding windows and recurrent state can't take back rejected drafts)")
    if not _same_vocabulary(lm, draft):
        raise errors.invalid_params(
            field, f"the draft model {draft.model_id!r} has a different tokenizer vocabulary than {lm.model_id!r}")


def _same_vocabulary(lm: LoadedModel, draft: LoadedModel) -> bool:
    """Token strings and ids compared one by one (sizes can match by chance);
    remembered per pair of loaded models."""
    if lm is draft:
        return True
    checked = _per_draft(lm, "draft_vocab_checked", draft)
    if checked.get("same") is None:
        checked["same"] = lm.hf_tokenizer.get_vocab() == draft.hf_tokenizer.get_vocab()
    return checked["same"]


def _per_draft(lm: LoadedModel, name: str, draft: LoadedModel) -> dict:
    """What ``lm`` remembers about one loaded draft (forgotten when that
    draft is unloaded and another loaded under its id)."""
    table = lm.extra.setdefault(name, {})
    held = table.get(draft.model_id)
    if held is None or held[0]() is not draft:
        held = table[draft.model_id] = (weakref.ref(draft), {})
    return held[1]


def _pair_store(lm: LoadedModel, draft: LoadedModel):
    """The prompt-cache store of a (target, draft) pair: entries hold both
    models' caches, so a hit continues both. Same limits as the target's own
    store, in the worker's one budget; none when the target's prompt cache is off."""
    base = lm.prompt_cache
    if base is None:
        return None
    held = _per_draft(lm, "draft_stores", draft)
    if "store" not in held:
        held["store"] = prompt_cache.PromptCacheStore(base.own_max_bytes, base.max_entries,
                                                      lambda keep: new_cache(lm, draft))
        if base.budget is not None:  # one budget with every other store (cache_budget.py)
            base.budget.attach(held["store"])
        held["store"].draft_lm = draft  # part of its disk namespace (cache_disk.py)
        cache_disk.attach(lm, held["store"], getattr(base, "disk", None))
    return held["store"]


def pair_stores(lm: LoadedModel) -> list:
    """The prompt-cache stores of ``lm`` as target, one per draft used."""
    return [held["store"] for _, held in lm.extra.get("draft_stores", {}).values() if "store" in held]


def forget(gone: LoadedModel, others) -> None:
    """An unloaded model's pair stores go with it, as a draft of the others
    and as a target."""
    for lm in [gone, *others]:
        for name in ("draft_stores", "draft_vocab_checked"):
            table = lm.extra.get(name, {})
            for key in [k for k, (ref, _) in table.items() if lm is gone or ref() is gone]:
                held = table.pop(key)[1]
                if "store" in held:
                    held["store"].clear()


def new_cache(lm: LoadedModel, draft: LoadedModel) -> list:
    return prompt_cache.make_cache(lm) + prompt_cache.make_cache(draft)


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
        return _pair_store(self.target, self.lm)

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

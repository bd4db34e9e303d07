"""Draft pairing: which loaded models may draft for which, and the prompt-cache
stores of each (target, draft) pair (protocol/README.md, "Speculative decoding")."""

from __future__ import annotations

import weakref
from typing import Callable

from mlx_lm.models.cache import KVCache, QuantizedKVCache

from ..cache import disk as cache_disk, store as prompt_cache
from .. import errors, protocol
from ..errors import WorkerError
from ..models.loaded import LoadedModel

# target -> draft id -> (a weak reference to that draft, what the target keeps of the pair)
_PAIRS: "weakref.WeakKeyDictionary[LoadedModel, dict[str, tuple]]" = weakref.WeakKeyDictionary()


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
            raise errors.invalid_params(
                field, f"speculative decoding does not support vision models ({which} {m.model_id!r})")
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


class LoadPairing:
    """``load {draft_model_id}``: the draft named, checked before the target
    loads, and the pair checked once it has (the registry's load hooks)."""

    FIELD = "params.draft_model_id"

    def before_load(self, get: Callable[[str], LoadedModel], params: protocol.LoadParams) -> None:
        if params.parallel is not None and params.draft_model_id is not None:  # before any rank starts
            raise errors.invalid_params(self.FIELD,
                                        "speculative decoding is not supported on a distributed (parallel) model")
        if params.draft_model_id is not None:  # loaded first, like any model
            find(get, params.draft_model_id, self.FIELD)
        elif params.num_draft_tokens:  # a default length for no default draft: never used
            raise errors.invalid_params("params.num_draft_tokens", "num_draft_tokens needs a draft_model_id")

    def after_load(self, get: Callable[[str], LoadedModel], params: protocol.LoadParams, lm: LoadedModel) -> None:
        if params.draft_model_id is not None:
            check_pair(lm, find(get, params.draft_model_id, self.FIELD), self.FIELD)

    def stores(self, lm: LoadedModel) -> list:
        return pair_stores(lm)

    def forget(self, gone: LoadedModel, others) -> None:
        forget(gone, others)


def _per_draft(lm: LoadedModel, draft: LoadedModel) -> dict:
    """What ``lm`` keeps about one loaded draft (forgotten when that draft
    is unloaded and another loaded under its id)."""
    table = _PAIRS.setdefault(lm, {})
    held = table.get(draft.model_id)
    if held is None or held[0]() is not draft:
        held = table[draft.model_id] = (weakref.ref(draft), {})
    return held[1]


def _same_vocabulary(lm: LoadedModel, draft: LoadedModel) -> bool:
    """Token strings and ids compared one by one (sizes can match by chance);
    remembered per pair of loaded models."""
    if lm is draft:
        return True
    held = _per_draft(lm, draft)
    if held.get("same_vocabulary") is None:
        held["same_vocabulary"] = lm.hf_tokenizer.get_vocab() == draft.hf_tokenizer.get_vocab()
    return held["same_vocabulary"]


def pair_store(lm: LoadedModel, draft: LoadedModel):
    """The prompt-cache store of a (target, draft) pair: entries hold both
    models' caches, so a hit continues both. Same limits as the target's own
    store, in the worker's one budget; none when the target's prompt cache is off."""
    base = lm.prompt_cache
    if base is None:
        return None
    held = _per_draft(lm, draft)
    if "store" not in held:
        held["store"] = prompt_cache.PromptCacheStore(base.own_max_bytes, base.max_entries,
                                                      lambda keep: new_cache(lm, draft))
        if base.budget is not None:  # one budget with every other store (cache/budget.py)
            base.budget.attach(held["store"])
        held["store"].draft_lm = draft  # part of its disk namespace (cache/disk.py)
        cache_disk.attach(lm, held["store"], getattr(base, "disk", None))
    return held["store"]


def pair_stores(lm: LoadedModel) -> list:
    """The prompt-cache stores of ``lm`` as target, one per draft used."""
    return [held["store"] for _, held in list(_PAIRS.get(lm, {}).values()) if "store" in held]


def forget(gone: LoadedModel, others) -> None:
    """An unloaded model's pair stores go with it, as a draft of the others
    and as a target."""
    for lm in [gone, *others]:
        table = _PAIRS.get(lm, {})
        for key in [k for k, (ref, _) in table.items() if lm is gone or ref() is gone]:
            held = table.pop(key)[1]
            if "store" in held:
                held["store"].clear()
    _PAIRS.pop(gone, None)


def new_cache(lm: LoadedModel, draft: LoadedModel) -> list:
    return prompt_cache.make_cache(lm) + prompt_cache.make_cache(draft)

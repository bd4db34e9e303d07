"""A prompt-cache entry, and how a finished request's cache becomes one.

Spec: protocol/README.md § Prompt cache (§ Rotating caches and other
untrimmable state for windows and checkpoints).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Optional

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from . import checkpoints
from .checkpoints import Checkpoint
from .layers import cache_nbytes, cache_offset, cache_window, compact

log = logging.getLogger("mlx_worker.cache.store")

MAX_CHECKPOINTS = 8  # per entry (a conversation): the first and the latest are kept


@dataclass
class Entry:
    key: list  # cache_key of exactly the tokens the cache holds
    n_prompt: int  # how many of them were the request's prompt (the rest: its output)
    cache: list
    nbytes: int
    exact_only: bool  # untrimmable: reusable only by prompts extending all of key
    window: Optional[int]  # smallest rotating window, None if nothing rotates
    step: Optional[int]  # windowed: the prefill step that produced this state
    keep: int  # the rotating caches' keep
    # Untrimmable state at earlier positions of key, by position (checkpoints.py).
    checkpoints: list[Checkpoint] = field(default_factory=list)
    final: bool = True  # the state is at len(key) (False: only checkpoints are usable)
    used: int = 0  # worker-wide use count (cache_budget.py): the LRU order across stores

    def state_at(self, pos: int) -> list:
        """A fresh cache holding key[:pos], from the entry's own state or the
        checkpoint at ``pos``; the entry is not changed."""
        if pos == len(self.key) and self.final:
            return compact(copy.deepcopy(self.cache))
        for cp in self.checkpoints:
            if cp.pos == pos:
                return checkpoints.restore(self.cache, cp)
        cache = copy.deepcopy(self.cache)
        trim_prompt_cache(cache, len(self.key) - pos)
        return compact(cache)  # the first write then copies only the shared prefix

    def checkpoints_upto(self, pos: int) -> list[Checkpoint]:
        return [cp for cp in self.checkpoints if cp.pos <= pos]


def entry_from_run(key: list, n_prompt: int, cache: list, stop_reason: str, prefill_step: int, keep: int,
                   snapshot: Optional[Checkpoint], found: list[Checkpoint]) -> Optional[Entry]:
    """The entry a request's final ``cache`` makes, for ``key`` (its prompt's
    key and every token fed back; ``n_prompt`` of them its prompt), or None
    when no reusable state is left (see the spec's rules for windows and
    untrimmable state)."""
    offset = cache_offset(cache)
    final = True
    if offset is None:
        if stop_reason == "cancelled":  # can't tell what the state holds
            if not found:
                log.info("prompt cache: not storing a cancelled recurrent state")
                return None
            final, key = False, key[: max(cp.pos for cp in found)]
        offset = len(key)
    trimmable = can_trim_prompt_cache(cache)
    if offset > len(key) and trimmable:
        # Cancelled at the last progress call: the first sampled token is
        # in the cache but was never returned.
        trim_prompt_cache(cache, offset - len(key))
        offset = len(key)
    window = cache_window(cache)
    step = prefill_step if window is not None else None
    if window is not None and not trimmable:
        if snapshot is None:
            log.info("prompt cache: window of %d wrapped and no reusable snapshot; not stored", window)
            return None
        offset, cache = snapshot.pos, checkpoints.restore(cache, snapshot)
        trimmable = can_trim_prompt_cache(cache)
        found = []
    elif offset > len(key):
        if not found:
            log.info("prompt cache: untrimmable state past the known tokens; not stored")
            return None
        _cut_plain(cache, offset - len(key))  # only the checkpoints are usable
        final, offset = False, len(key)
    if offset <= 0:
        return None
    key = key[:offset]
    kept = _latest(found, offset) if window is None else []
    if not final:
        key = key[: max(cp.pos for cp in kept)] if kept else []
        _cut_plain(cache, offset - len(key))
        if not key:
            return None
    entry = Entry(
        key=key,
        n_prompt=min(len(key), n_prompt),
        cache=cache,
        nbytes=entry_nbytes(cache, kept),
        exact_only=not trimmable,
        window=window,
        step=step,
        keep=keep,
        checkpoints=kept,
        final=final,
    )
    return entry


def entry_nbytes(cache: list, cps: list[Checkpoint]) -> int:
    return cache_nbytes(cache) + sum(cp.nbytes for cp in cps)


def _latest(found: list[Checkpoint], upto: int) -> list[Checkpoint]:
    """The checkpoints an entry keeps: one per position within its tokens,
    at most MAX_CHECKPOINTS: the first (usually the system prompt's end,
    which other conversations share) and the latest (the turns a chat
    edits, regenerates and continues); the second earliest goes first."""
    by_pos = {cp.pos: cp for cp in found if 0 < cp.pos <= upto}
    kept = [by_pos[p] for p in sorted(by_pos)]
    return kept if len(kept) <= MAX_CHECKPOINTS else kept[:1] + kept[-(MAX_CHECKPOINTS - 1):]


def _cut_plain(cache: list, n: int) -> None:
    """Cut ``n`` tokens off the layers that can be cut (the rest are left as they are)."""
    if n <= 0:
        return
    for c in checkpoints.leaves(cache):
        if not checkpoints.needs_checkpoints([c]) and c.offset >= n:
            c.trim(n)

"""The prompt cache of one loaded model: stored entries in LRU order, matched by token key.

A new request continues from the entry sharing the longest token prefix with
it (its key: prompt ids, or image hashes where a vision prompt's images are);
the store matches keys and renders nothing: the prompt layer
(``system_prompt.py``) decides what a request keeps. Spec: protocol/README.md
§ Prompt cache; the design's reasoning: bench/results/design-notes.md § layers.
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import Callable, Optional

from mlx_lm.models.cache import trim_prompt_cache

from .. import protocol
from . import checkpoints
from .entry import MAX_CHECKPOINTS, Entry
from .layers import DEFAULT_KEEP, cache_nbytes, cache_offset, cache_window, compact, make_cache
from .lease import Lease
from .matching import usable

__all__ = [  # what the engine and the loaders use of the cache by this module's name
    "DEFAULT_KEEP", "MAX_CHECKPOINTS", "Entry", "Lease", "PromptCacheStore", "cache_nbytes", "cache_offset",
    "create_store", "make_cache",
]

log = logging.getLogger("mlx_worker.cache.store")

# The entry count is an option (load's prompt_cache_entries); bytes bind
# (cache_budget.py: one LRU across every store).
DEFAULT_ENTRIES = 4096


class PromptCacheStore:
    """Entries in LRU order (oldest first), bounded by count and bytes.
    Used on the compute thread; ``status`` may be read from any thread."""

    def __init__(self, max_bytes: Optional[int], max_entries: int, new_cache: Callable[[int], list]):
        self.own_max_bytes = max_bytes  # load's prompt_cache_bytes; None: the worker's budget
        self.max_entries = max_entries
        self.budget = None  # cache_budget.CacheBudget, set by attach
        self.on_evict: Optional[Callable[[Entry], None]] = None  # cache_disk.py: evicted entries go to disk
        self._new_cache = new_cache
        self._entries: list[Entry] = []
        self._bytes = 0
        self._lock = threading.Lock()
        self.checkpoint_nbytes = 0  # the largest checkpoint taken: admission counts a request's few
        self.stateful = False  # the model's entries keep checkpoints (Lease.stateful): set by create_store
        # Entries taken by a running request (its next turn), with its lease:
        # other requests sharing their prefix still start from a copy.
        self._taken_by: list[tuple[Entry, Lease]] = []

    # -------------------------------------------------------------- hooks

    def fetch(self, key: list, step: int, keep: int = DEFAULT_KEEP) -> Lease:
        """A lease on the cache to continue from (``lease.cache``) and how
        many of ``key``'s tokens it holds (``lease.cached``)."""
        n = len(key)
        best, best_m, reason = None, 0, "no stored prompt shares a prefix"
        for entry in reversed(self._entries):  # most recent first: wins ties
            m, why = usable(entry, key, step, keep)
            if m > best_m:
                best, best_m = entry, m
            elif m == 0 and why and best_m == 0:
                reason = why
        copied = self._copy_of_taken(key, step, keep, best_m)
        if copied is not None:
            return copied
        if best is None:
            cache = self._new_cache(keep)
            if self._entries:
                log.info("prompt cache miss (%d tokens): %s", n, reason)
            return Lease(self, cache, 0, step, keep, cache_window(cache), None, n)
        taken = None
        continues = best_m == len(best.key) and best.final  # the entry's own state, not a checkpoint
        if best_m > best.n_prompt and (continues or not best.exact_only):
            self._remove(best)  # the request continues that conversation: take it, no copy
            cache = best.cache
            trim_prompt_cache(cache, len(best.key) - best_m)
            taken = best
        else:
            self._touch(best)
            cache = best.state_at(best_m)
        log.debug("prompt cache hit: %d of %d tokens%s", best_m, n, " (taken)" if taken is not None else "")
        lease = Lease(self, cache, best_m, step, keep, best.window, taken, n, best.checkpoints_upto(best_m))
        if taken is None:
            lease.source = best
        elif not best.exact_only and best.window is None and not checkpoints.needs_checkpoints(cache):
            self._taken_by.append((best, lease))  # plain KV only: its prefix can be copied and trimmed
        return lease

    def saw_checkpoint(self, nbytes: int) -> None:
        self.checkpoint_nbytes = max(self.checkpoint_nbytes, nbytes)

    def _copy_of_taken(self, key: list, step: int, keep: int, stored: int) -> Optional[Lease]:
        """A copy of a taken entry's prefix, when it serves ``key`` better
        than what is stored: the request that took it writes only past the
        tokens it reused (MLX copies a buffer another array still uses), so
        that prefix stays valid in its cache while it runs."""
        best, best_m = None, stored
        for entry, lease in self._taken_by:
            shared = Entry(key=entry.key[: lease.cached], n_prompt=lease.cached, cache=entry.cache, nbytes=0,
                           exact_only=False, window=None, step=None, keep=entry.keep)
            m, _ = usable(shared, key, step, keep)
            if m > best_m:
                best, best_m = entry, m
        if best is None:
            return None
        cache = copy.deepcopy(best.cache)
        for c in checkpoints.leaves(cache):  # each layer on its own: a paused draft's half lags the target's
            if c.offset > best_m:
                c.trim(c.offset - best_m)
        log.debug("prompt cache hit: %d of %d tokens (from a running request's prefix)", best_m, len(key))
        return Lease(self, compact(cache), best_m, step, keep, None, None, len(key))

    def release(self, lease: Lease) -> None:
        """``lease`` ended: the entry it took is no longer a running request's."""
        self._taken_by = [(e, l) for e, l in self._taken_by if l is not lease]

    @property
    def max_bytes(self) -> int:
        if self.budget is None:
            return self.own_max_bytes or 0
        if self.own_max_bytes is None:
            return self.budget.max_bytes
        return min(self.own_max_bytes, self.budget.max_bytes)

    def oldest_use(self) -> Optional[int]:
        with self._lock:
            return self._entries[0].used if self._entries else None

    def evict_lru(self, nbytes: int) -> int:
        """Drop least recently used entries until ``nbytes`` are freed (or
        none is left); the bytes freed. Admission calls this before refusing."""
        freed = 0
        gone = []
        with self._lock:
            while self._entries and freed < nbytes:
                old = self._entries.pop(0)
                self._bytes -= old.nbytes
                freed += old.nbytes
                gone.append(old)
        self._evicted(gone)
        return freed

    def _evicted(self, gone: list) -> None:
        if self.on_evict is not None:
            for entry in gone:
                self.on_evict(entry)

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries)

    # ----------------------------------------------------------- the rest

    def add(self, entry: Entry) -> bool:
        """Insert, evicting least recently used entries; False if it can't fit."""
        if entry.nbytes > self.max_bytes or self.max_entries < 1:
            log.info("prompt cache: entry of %d bytes exceeds the budget of %d; not stored",
                     entry.nbytes, self.max_bytes)
            return False
        positions = {cp.pos for cp in entry.checkpoints}
        for old in list(self._entries):
            redundant = old.key == entry.key and entry.final or (
                len(old.key) < len(entry.key)
                and (not entry.exact_only or len(old.key) in positions)
                and entry.key[: len(old.key)] == old.key
                and (old.window is None or old.keep == entry.keep)
            )
            if redundant:  # the new entry serves everything the old one did
                self._remove(old)
        if self.budget is not None:
            entry.used = self.budget.use()
        max_bytes = self.max_bytes
        gone = []
        with self._lock:
            self._entries.append(entry)
            self._bytes += entry.nbytes
            while len(self._entries) > self.max_entries or self._bytes > max_bytes:
                evicted = self._entries.pop(0)
                self._bytes -= evicted.nbytes
                gone.append(evicted)
        self._evicted(gone)
        if self.budget is not None:
            self.budget.enforce()
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
        self._taken_by.clear()

    def status(self) -> protocol.PromptCacheStatus:
        with self._lock:
            return protocol.PromptCacheStatus(
                entries=len(self._entries),
                bytes=self._bytes,
                max_bytes=self.max_bytes,
                max_entries=self.max_entries,
                checkpoints=sum(len(e.checkpoints) for e in self._entries),
                checkpoint_bytes=sum(cp.nbytes for e in self._entries for cp in e.checkpoints),
            )

    def drop(self, entry: Entry) -> None:
        """Remove ``entry`` if it is stored (a request failed on it)."""
        if any(e is entry for e in self._entries):
            self._remove(entry)

    def _remove(self, entry: Entry) -> None:
        with self._lock:
            self._entries = [e for e in self._entries if e is not entry]
            self._bytes -= entry.nbytes

    def _touch(self, entry: Entry) -> None:
        if self.budget is not None:
            entry.used = self.budget.use()
        with self._lock:
            self._entries = [e for e in self._entries if e is not entry]
            self._entries.append(entry)


def create_store(lm, params: protocol.LoadParams) -> Optional[PromptCacheStore]:
    """The store for a freshly loaded model; None when the host disabled it."""
    from . import budget as cache_budget

    max_bytes = params.prompt_cache_bytes
    max_entries = DEFAULT_ENTRIES if params.prompt_cache_entries is None else params.prompt_cache_entries
    if max_bytes == 0 or max_entries == 0:
        return None
    store = PromptCacheStore(max_bytes, max_entries, lambda keep: make_cache(lm, keep))
    cache_budget.budget().attach(store)
    probe = make_cache(lm)
    store.stateful = checkpoints.needs_checkpoints(probe) and cache_window(probe) is None
    return store

"""One byte budget for every prompt-cache store: one LRU across stores.

Each store (a model's, each (target, draft) pair's) reports here when an
entry goes in or is read; while the stores together hold more than
``max_bytes``, the globally least recently used entry is evicted through its
own store's ``evict_lru``. A store's own caps still apply within it.
Spec: protocol/README.md § Prompt cache, § Configuration (`load` params).
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from typing import Optional

DEFAULT_MEMORY_FRACTION = 0.25  # of physical memory


class CacheBudget:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._stores: "weakref.WeakSet" = weakref.WeakSet()
        self._uses = itertools.count(1)
        self._lock = threading.Lock()
        self.hits = 0  # requests that continued from an entry in RAM
        # bytes MLX holds over the worker's memory limit (memory.py sets it):
        # entries go first when weights + requests + entries exceed it
        self.over_limit = lambda: 0

    def attach(self, store) -> None:
        store.budget = self
        with self._lock:
            self._stores.add(store)

    def stores(self) -> list:
        with self._lock:
            return list(self._stores)

    def use(self) -> int:
        return next(self._uses)

    def bytes(self) -> int:
        return sum(s.status().bytes for s in self.stores())

    def entries(self) -> int:
        return sum(s.status().entries for s in self.stores())

    def enforce(self) -> int:
        """Evict globally oldest entries until the stores fit ``max_bytes``."""
        over = max(self.bytes() - self.max_bytes, self.over_limit())
        return self.evict(over) if over > 0 else 0

    def evict(self, nbytes: int, first: Optional[list] = None) -> int:
        """Free at least ``nbytes`` (or everything), oldest entry first across
        the stores; ``first``: stores to empty before the others (say, those
        no running request uses). The bytes freed."""
        freed = 0
        for pool in ([first] if first else []) + [None]:
            while freed < nbytes:
                store = self._oldest(pool)
                if store is None:
                    break
                got = store.evict_lru(1)  # exactly its oldest entry
                if got <= 0:
                    break
                freed += got
        return freed

    def _oldest(self, pool: Optional[list]):
        best, best_use = None, None
        for store in pool if pool is not None else self.stores():
            use = store.oldest_use()
            if use is not None and (best_use is None or use < best_use):
                best, best_use = store, use
        return best


_budget: Optional[CacheBudget] = None


def budget() -> CacheBudget:
    """The worker's budget: ``--prompt-cache-bytes``, else a quarter of RAM."""
    global _budget
    if _budget is None:
        _budget = CacheBudget(int(_total_memory() * DEFAULT_MEMORY_FRACTION))
    return _budget


def _total_memory() -> int:
    try:  # no MLX import here: `status` may come before the compute thread imported it
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def set_max_bytes(max_bytes: int) -> int:
    """Change the budget (``--prompt-cache-bytes``, ``set_limits``); evicts
    what no longer fits. The bytes evicted."""
    b = budget()
    b.max_bytes = max_bytes
    return b.enforce()

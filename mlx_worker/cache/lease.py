"""One request's hold on a prompt-cache store (fetch -> progress -> commit or abort).

Spec: protocol/README.md § Prompt cache.
"""

from __future__ import annotations

import logging
from typing import Optional

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from . import checkpoints
from .checkpoints import Checkpoint
from .entry import Entry, entry_from_run, entry_nbytes
from .layers import cache_offset

log = logging.getLogger("mlx_worker.cache.store")


class Lease:
    """One request's hold on the store: fetch -> progress per prefill chunk
    -> commit (its cache goes in) or abort (what it took goes back). The
    request's own state lives here, not on the shared store, so any number
    of requests can hold leases at once. ``store`` is the PromptCacheStore
    that handed it out (store.py imports this module, so it is not named)."""

    def __init__(self, store, cache: list, cached: int, step: int, keep: int,
                 window: Optional[int], taken: Optional[Entry], n_prompt: int = 0,
                 inherited: Optional[list[Checkpoint]] = None):
        self.store = store
        self.cache = cache
        self.cached = cached
        self.step = step
        self.keep = keep
        self.window = window
        self.n_prompt = n_prompt
        self._taken = taken  # the entry this request continues in place (no copy)
        self.source: Optional[Entry] = None  # the entry it copied from, if any
        self._snapshot: Optional[Checkpoint] = None  # max_kv_size: the last reusable chunk boundary
        self._stateful = checkpoints.needs_checkpoints(cache) and window is None
        self._checkpoints: list[Checkpoint] = list(inherited or [])  # from the entry it started from
        self._chunk_end: Optional[Checkpoint] = None  # the last prefill chunk's end
        self._marks: list[int] = []  # positions prefill stops at for a checkpoint (a system prompt's end)
        if self._stateful and cached > 0 and all(cp.pos != cached for cp in self._checkpoints):
            self._add(checkpoints.take(cache, cached))  # where it resumed: a turn's end
        self._open = True

    @property
    def reused_bytes(self) -> int:
        """Bytes of KV this request continues in place: already allocated
        (its checkpoints stay allocated beside it: not counted)."""
        if self._taken is None:
            return 0
        return self._taken.nbytes - sum(cp.nbytes for cp in self._taken.checkpoints)

    @property
    def stateful(self) -> bool:
        """Whether this request's cache keeps checkpoints."""
        return self._stateful

    def mark(self, pos: int) -> None:
        """Ask for a checkpoint at ``pos`` (prefill ends a chunk there)."""
        if self._stateful and self.cached < pos < self.n_prompt - 1:
            self._marks.append(pos)

    def next_stop(self, processed: int) -> Optional[int]:
        """The next position prefill must stop at, if any."""
        return min((m for m in self._marks if m > processed), default=None)

    def progress(self, cache: list, processed: int) -> None:
        """Called after each prefill chunk: takes the checkpoints (see module
        doc); their bytes are part of the request's admission
        (memory.generate_need)."""
        if processed <= 0 or not (self._stateful or self.window is not None):
            return
        offset = cache_offset(cache)
        if offset is not None and offset != processed:  # past the prompt (first token fed)
            return
        if self.window is not None:  # max_kv_size: only where an uncached run shares the state
            if processed < self.window or processed % self.step == 0:
                self._snapshot = checkpoints.take(cache, processed)
            return
        cp = checkpoints.take(cache, processed)
        if processed == self.n_prompt - 1 or processed in self._marks:
            # The prompt's end: resent, regenerated and the next turn resume
            # here; a system prompt's end: other conversations start here.
            self._add(cp)
        else:
            self._chunk_end = cp
        self.store.saw_checkpoint(cp.nbytes)

    def _add(self, cp: Checkpoint) -> None:
        self._checkpoints = [c for c in self._checkpoints if c.pos != cp.pos] + [cp]

    def commit(self, prompt, cache: list, sampled: list[int], stop_reason: str) -> Optional[Entry]:
        """Store the cache a request leaves: its prompt plus every sampled
        token fed back (a terminating EOS included: the next chat turn
        usually starts with it). Tokens past a cancel or a stop string stay in
        the key; a later prompt that doesn't share them trims them off.
        Returns the entry kept, if any."""
        if not self._open:
            return None
        self._open = False
        self.store.release(self)
        self._taken = None
        snapshot, self._snapshot = self._snapshot, None
        found = self._checkpoints + ([self._chunk_end] if self._chunk_end is not None else [])
        self._checkpoints, self._chunk_end = [], None
        key = list(prompt.cache_key) + list(sampled)
        entry = entry_from_run(key, len(prompt.cache_key), cache, stop_reason, self.step, self.keep, snapshot, found)
        return entry if entry is not None and self.store.add(entry) else None

    def abort(self, poisoned: bool = False) -> None:
        """The request failed: put back the entry it took, cut to what it
        held when taken (a state that can't be cut back is dropped).
        ``poisoned``: it failed while computing on that cache, which may be
        why: the entry it took, or the one it copied, leaves the store."""
        if not self._open:
            return
        self._open = False
        self.store.release(self)
        taken, self._taken, self._snapshot = self._taken, None, None
        held, self._checkpoints, self._chunk_end = self._checkpoints, [], None
        source, self.source = self.source, None
        if poisoned:
            if source is not None:
                self.store.drop(source)
            if taken is not None or source is not None:
                log.warning("prompt cache: a request failed on a cached prefix; that entry is dropped")
            return
        if taken is None:
            return
        try:
            self._put_back(taken, held)
        except Exception:  # never raises: the failed request's answer must go out
            log.exception("prompt cache: a failed request's entry could not be put back; dropped")

    def _put_back(self, taken: Entry, held: list[Checkpoint]) -> None:
        offset = cache_offset(taken.cache)
        at_start = next((cp for cp in held if cp.pos == self.cached), None)
        if at_start is not None:  # rebuilt from where it resumed
            taken.cache = checkpoints.restore(taken.cache, at_start)
        elif offset is not None and offset > self.cached:
            if not can_trim_prompt_cache(taken.cache):
                log.info("prompt cache: a failed request's untrimmable state is dropped")
                return
            trim_prompt_cache(taken.cache, offset - self.cached)
        taken.key = taken.key[: self.cached]
        taken.n_prompt = min(taken.n_prompt, self.cached)
        taken.checkpoints = [cp for cp in held if cp.pos < self.cached]
        taken.final = True
        taken.nbytes = entry_nbytes(taken.cache, taken.checkpoints)
        if taken.key:
            self.store.add(taken)

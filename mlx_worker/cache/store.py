"""Prompt (KV) cache reuse across requests: one LRU store per loaded model.

A chat host resends the whole history every turn. The store keeps the KV
caches of recent requests (prompt + generated tokens), and a new request
continues from the entry sharing the longest token prefix with it, trimmed
to that prefix, so only the rest of the prompt is processed.

Rules that keep the output identical to an uncached run:

* At least one prompt token is always processed (its logits give the first
  token).
* Plain KV caches are trimmable: any prefix of an entry is reusable.
* Windowed caches (a RotatingKVCache from ``max_kv_size`` or a model's own
  sliding-window layers): once more tokens than the window have gone
  through, mlx-lm's result depends on how the prompt was chunked (a prefill
  chunk and a decode step see different keys), and the cache can no longer
  be trimmed. So a state is reused only where an uncached run of the new
  prompt would be in the very same state: anywhere below the window, and
  beyond it only at a prefill chunk boundary (a multiple of the prefill step)
  reached by the same chunking. A request that wraps the window stores a
  snapshot taken at its last such boundary instead of its final state.
  (This is ``max_kv_size``'s window, which keeps its first tokens.)
* A model's own sliding windows (``keep`` 0) give the same result however
  the prompt is chunked (up to rounding), as does recurrent state; neither
  can be cut back. An entry of such a model keeps **checkpoints**
  (checkpoints.py): copies of those layers' state at the positions a later
  prompt is likely to share: where its prompt processing ended (one token
  before the prompt's end: the last token goes in with the first decode
  step), where a chat's system prompt ends (prefill stops there), the last
  prefill chunk's end, and where it started from; the end of the answer is
  the entry's own state. A prompt resumes from the entry's own
  state when it extends all of it, else from the nearest checkpoint at or
  before the shared prefix. An entry carries its predecessors' checkpoints
  (at most ``MAX_CHECKPOINTS``: the first and the latest) and counts their
  bytes.

mlx-lm's ``LRUPromptCache`` (used by ``mlx_lm.server``) was the model for
this; it isn't used directly because it can't express the windowed rules
above (an entry valid only at its exact length and chunking), leaves nothing
to process on an exact hit, and doesn't refresh an entry's LRU position when
it is read.

Ownership: a request that continues into an entry's answer (the next turn
of that chat: the earlier prompt and some of the answer) takes the entry out
of the store under its lease, trims off what it doesn't share and writes
into it: no copy. Its own cache goes back in when it finishes (commit); if
it fails, the lease puts back what it took (abort). Any other reuse (an
edited message, a regenerated answer, a shared system prompt or a loaded
cache file that many concurrent requests start from) gets a copy, so the
entry stays available to the others: new cache objects whose arrays share
the stored buffers, cut to the shared prefix (MLX never writes into a buffer
another array still uses; the first write copies the prefix).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from mlx_lm.models.cache import (
    CacheList,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)

import msgspec

from . import checkpoints
from .. import protocol
from .checkpoints import Checkpoint
from ..errors import WorkerError
from .kv_quant import quantize_layers
from ..prompt import encode_text, render_chat

log = logging.getLogger("mlx_worker.cache.store")

# The entry count is an option (load's prompt_cache_entries); bytes bind
# (cache_budget.py: one LRU across every store).
DEFAULT_ENTRIES = 4096
DEFAULT_KEEP = 4  # mlx-lm's own: the first tokens a rotating cache never evicts
MAX_CHECKPOINTS = 8  # per entry (a conversation): the first and the latest are kept


# ------------------------------------------------------------ building caches


def make_cache(lm, keep: int = DEFAULT_KEEP) -> list:
    """A fresh cache for ``lm``: the model's own layout, with plain KV layers
    made rotating when the model was loaded with ``max_kv_size``.

    (mlx-lm's ``make_prompt_cache`` ignores ``max_kv_size`` for every model
    that defines ``make_cache``, Llama included.) With ``kv_bits`` the
    plain KV layers are quantized from the first token (kv_quant.py)."""
    cache = quantize_layers(make_prompt_cache(lm.model), lm.kv_quant)
    if lm.max_kv_size:
        cache = [
            RotatingKVCache(max_size=lm.max_kv_size, keep=keep) if type(c) is KVCache else c
            for c in cache
        ]
    return cache


def keep_for(lm, params, tokens: list[int]) -> int:
    """How many leading tokens a rotating cache keeps when it wraps: the
    system prompt's, for a chat that starts with system messages (at most
    half the window); mlx-lm's 4 otherwise. The cached and the uncached path
    both use it, so it never makes them differ."""
    if not lm.max_kv_size:
        return DEFAULT_KEEP
    keep = DEFAULT_KEEP
    messages = getattr(params, "messages", None)
    if messages and lm.vision is None:
        n_system = 0
        while n_system < len(messages) and messages[n_system].role in ("system", "developer"):
            n_system += 1
        if n_system:
            keep = max(keep, _system_tokens(lm, params, n_system, tokens))
    return max(0, min(keep, lm.max_kv_size // 2))


def system_end(lm, params, tokens: list[int]) -> int:
    """Where a chat's leading system/developer messages end in its tokens (0:
    none, or nothing after them): other conversations with the same system
    prompt share that prefix, so a stateful cache checkpoints it."""
    messages = getattr(params, "messages", None)
    if not messages or lm.vision is not None:
        return 0
    n_system = 0
    while n_system < len(messages) and messages[n_system].role in ("system", "developer"):
        n_system += 1
    if not n_system or n_system == len(messages):
        return 0
    return _system_tokens(lm, params, n_system, tokens)


def _system_tokens(lm, params, n_system: int, tokens: list[int]) -> int:
    head = msgspec.structs.replace(params, messages=params.messages[:n_system], add_generation_prompt=False)
    try:
        system = encode_text(lm, render_chat(lm, head), add_special_tokens=False)
    except WorkerError:
        return 0
    return common_prefix(system, tokens, len(system))


# --------------------------------------------------------- cache inspection


def _layers(cache: list):
    for c in cache:
        if isinstance(c, CacheList):
            yield from _layers(list(c.caches))
        else:
            yield c


def cache_offset(cache: list) -> Optional[int]:
    """Tokens the cache has seen; None when no layer counts them."""
    for c in _layers(cache):
        offset = getattr(c, "offset", None)
        if isinstance(offset, int):
            return offset
    return None


def cache_window(cache: list) -> Optional[int]:
    """The smallest rotating window that keeps leading tokens (``max_kv_size``'s):
    once wrapped, its results depend on the prefill chunking. None if no
    layer has one (a model's own sliding windows keep nothing: any
    chunking gives their result, so checkpoints serve them)."""
    sizes = [c.max_size for c in _layers(cache) if isinstance(c, RotatingKVCache) and c.keep > 0]
    return min(sizes) if sizes else None


def cache_nbytes(cache: list) -> int:
    total = 0
    for c in cache:
        try:
            total += c.nbytes
        except (NotImplementedError, AttributeError):
            from mlx.utils import tree_flatten

            total += sum(getattr(v, "nbytes", 0) for _, v in tree_flatten(c.state))
    return total


def compact(cache: list) -> list:
    """Plain KV layers cut to the tokens they hold (their buffers grow in
    256-token steps and keep trimmed tokens). The cut shares the buffer; the
    layer's next write copies only those tokens, not the whole buffer."""
    out = []
    for c in cache:
        if type(c) is KVCache and c.keys is not None and c.keys.shape[2] > c.offset:
            cut = KVCache()
            cut.keys, cut.values = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
            cut.offset = c.offset
            c = cut
        elif type(c) is QuantizedKVCache and c.keys is not None and c.keys[0].shape[2] > c.offset:
            cut = QuantizedKVCache(c.group_size, c.bits)
            cut.keys, cut.values = (tuple(x[..., : c.offset, :] for x in kv) for kv in (c.keys, c.values))
            cut.offset = c.offset
            c = cut
        out.append(c)
    return out


def common_prefix(a: list, b: list, limit: int) -> int:
    """Length of the common prefix of a and b, at most ``limit``. Elements
    are compared with ==, so image hashes in a vision key work too. List
    slices compare in C: a binary search beats a Python loop by far."""
    n = min(len(a), len(b), limit)
    if n <= 0 or a[:n] == b[:n]:
        return max(n, 0)
    lo, hi = 0, n  # a[:lo] == b[:lo]; a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


# -------------------------------------------------------------------- store


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


class Lease:
    """One request's hold on the store: fetch -> progress per prefill chunk
    -> commit (its cache goes in) or abort (what it took goes back). The
    request's own state lives here, not on the shared store, so any number
    of requests can hold leases at once."""

    def __init__(self, store: "PromptCacheStore", cache: list, cached: int, step: int, keep: int,
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
        self.store._saw_checkpoint(cp.nbytes)

    def _add(self, cp: Checkpoint) -> None:
        self._checkpoints = [c for c in self._checkpoints if c.pos != cp.pos] + [cp]

    def commit(self, prompt, cache: list, fed_back: list[int], stop_reason: str) -> Optional[Entry]:
        """Store the cache a request leaves: its prompt plus every sampled
        token fed back (a terminating EOS included: the next chat turn
        usually starts with it). Tokens past a cancel or a stop string stay in
        the key; a later prompt that doesn't share them trims them off.
        Returns the entry kept, if any."""
        if not self._open:
            return None
        self._open = False
        self.store._return_lent(self)
        self._taken = None
        snapshot, self._snapshot = self._snapshot, None
        found = self._checkpoints + ([self._chunk_end] if self._chunk_end is not None else [])
        self._checkpoints, self._chunk_end = [], None
        return self.store._insert(self, prompt, cache, fed_back, stop_reason, snapshot, found)

    def abort(self, poisoned: bool = False) -> None:
        """The request failed: put back the entry it took, cut to what it
        held when taken (a state that can't be cut back is dropped).
        ``poisoned``: it failed while computing on that cache, which may be
        why: the entry it took, or the one it copied, leaves the store."""
        if not self._open:
            return
        self._open = False
        self.store._return_lent(self)
        taken, self._taken, self._snapshot = self._taken, None, None
        held, self._checkpoints, self._chunk_end = self._checkpoints, [], None
        source, self.source = self.source, None
        if poisoned:
            if source is not None and any(e is source for e in self.store._entries):
                self.store._remove(source)
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
        taken.nbytes = _entry_nbytes(taken.cache, taken.checkpoints)
        if taken.key:
            self.store.add(taken)


def _entry_nbytes(cache: list, cps: list[Checkpoint]) -> int:
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
        self._lent: list[tuple[Entry, Lease]] = []

    # -------------------------------------------------------------- hooks

    def fetch(self, key: list, step: int, keep: int = DEFAULT_KEEP) -> Lease:
        """A lease on the cache to continue from (``lease.cache``) and how
        many of ``key``'s tokens it holds (``lease.cached``)."""
        n = len(key)
        best, best_m, reason = None, 0, "no stored prompt shares a prefix"
        for entry in reversed(self._entries):  # most recent first: wins ties
            m, why = self._usable(entry, key, step, keep)
            if m > best_m:
                best, best_m = entry, m
            elif m == 0 and why and best_m == 0:
                reason = why
        lent = self._from_lent(key, step, keep, best_m)
        if lent is not None:
            return lent
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
            self._lent.append((best, lease))  # plain KV only: its prefix can be copied and trimmed
        return lease

    def _saw_checkpoint(self, nbytes: int) -> None:
        self.checkpoint_nbytes = max(self.checkpoint_nbytes, nbytes)

    def _insert(self, lease: Lease, prompt, cache: list, fed_back: list[int], stop_reason: str,
                snapshot: Optional[Checkpoint], found: list[Checkpoint]) -> Optional[Entry]:
        key = list(prompt.cache_key) + list(fed_back)
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
        step = lease.step if window is not None else None
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
            n_prompt=min(len(key), len(prompt.cache_key)),
            cache=cache,
            nbytes=_entry_nbytes(cache, kept),
            exact_only=not trimmable,
            window=window,
            step=step,
            keep=lease.keep,
            checkpoints=kept,
            final=final,
        )
        return entry if self.add(entry) else None

    def _from_lent(self, key: list, step: int, keep: int, stored: int) -> Optional[Lease]:
        """A copy of a taken entry's prefix, when it serves ``key`` better
        than what is stored: the request that took it writes only past the
        tokens it reused (MLX copies a buffer another array still uses), so
        that prefix stays valid in its cache while it runs."""
        best, best_m = None, stored
        for entry, lease in self._lent:
            shared = Entry(key=entry.key[: lease.cached], n_prompt=lease.cached, cache=entry.cache, nbytes=0,
                           exact_only=False, window=None, step=None, keep=entry.keep)
            m, _ = self._usable(shared, key, step, keep)
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

    def _return_lent(self, lease: Lease) -> None:
        self._lent = [(e, l) for e, l in self._lent if l is not lease]

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
        self._lent.clear()

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

    def _usable(self, entry: Entry, key: list, step: int, keep: int) -> tuple[int, str]:
        """How many of key's tokens this entry can provide, and if none, why."""
        n = len(key)
        c = common_prefix(entry.key, key, n - 1)
        if c == 0:
            return 0, ""
        if entry.window is not None and entry.keep != keep:
            return 0, f"rotating cache kept {entry.keep} leading tokens; this prompt keeps {keep}"
        if entry.exact_only:
            if entry.step is not None and entry.step != step:
                return 0, f"the stored state was prefilled in steps of {entry.step}, this request uses {step}"
            if c >= len(entry.key) and entry.final:
                return len(entry.key), ""
            near = max((cp.pos for cp in entry.checkpoints if cp.pos <= c), default=0)
            if near == 0:
                return 0, (f"the stored state can't be trimmed (recurrent or wrapped window); "
                           f"it covers {len(entry.key)} tokens, the prompt shares {c}, and no "
                           f"checkpoint lies within them")
            return near, ""
        if entry.window is not None and n > entry.window:
            # The uncached run wraps the window: reuse only at its chunk boundaries.
            aligned = c // step * step
            if aligned == 0:
                return 0, (f"prompt of {n} tokens wraps the window of {entry.window}; the shared "
                           f"{c} tokens reach no prefill boundary (step {step})")
            return aligned, ""
        return c, ""

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


# ------------------------------------------------------------------ at load


def total_memory() -> int:
    try:
        import mlx.core as mx

        size = mx.device_info().get("memory_size")
        if isinstance(size, int) and size > 0:
            return size
    except Exception:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


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

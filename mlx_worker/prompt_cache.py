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
* Recurrent state (ArraysCache layers) can't be trimmed: an entry is reused
  only by a prompt that extends all of its tokens.

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
from dataclasses import dataclass
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

from . import protocol
from .errors import WorkerError
from .kv_quant import quantize_layers
from .prompt import encode_text, render_chat

log = logging.getLogger("mlx_worker.prompt_cache")

# The entry count is an option (load's prompt_cache_entries); bytes bind
# (cache_budget.py: one LRU across every store).
DEFAULT_ENTRIES = 4096
DEFAULT_KEEP = 4  # mlx-lm's own: the first tokens a rotating cache never evicts


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
    """The smallest rotating window among the layers; None if none rotates."""
    sizes = [c.max_size for c in _layers(cache) if isinstance(c, RotatingKVCache)]
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
    used: int = 0  # worker-wide use count (cache_budget.py): the LRU order across stores


class Lease:
    """One request's hold on the store: fetch -> progress per prefill chunk
    -> commit (its cache goes in) or abort (what it took goes back). The
    request's own state lives here, not on the shared store, so any number
    of requests can hold leases at once."""

    def __init__(self, store: "PromptCacheStore", cache: list, cached: int, step: int, keep: int,
                 window: Optional[int], taken: Optional[Entry]):
        self.store = store
        self.cache = cache
        self.cached = cached
        self.step = step
        self.keep = keep
        self.window = window
        self._taken = taken  # the entry this request continues in place (no copy)
        self._snapshot: Optional[tuple[int, list]] = None
        self._open = True

    @property
    def reused_bytes(self) -> int:
        """Bytes of KV this request continues in place: already allocated."""
        return self._taken.nbytes if self._taken is not None else 0

    def progress(self, cache: list, processed: int) -> None:
        """Called after each prefill chunk. A windowed cache keeps a snapshot
        of the last state an uncached run would share (see module doc); its
        bytes are part of the request's admission (memory.generate_need)."""
        if self.window is None or processed <= 0:
            return
        if cache_offset(cache) != processed:  # past the prompt (first token fed)
            return
        if processed < self.window or processed % self.step == 0:
            self._snapshot = (processed, copy.deepcopy(cache))

    def commit(self, prompt, cache: list, fed_back: list[int], stop_reason: str) -> Optional[Entry]:
        """Store the cache a request leaves: its prompt plus every sampled
        token fed back (a terminating EOS included: the next chat turn
        usually starts with it). Tokens past a cancel or a stop string stay in
        the key; a later prompt that doesn't share them trims them off.
        Returns the entry kept, if any."""
        if not self._open:
            return None
        self._open = False
        self._taken = None
        snapshot, self._snapshot = self._snapshot, None
        return self.store._insert(self, prompt, cache, fed_back, stop_reason, snapshot)

    def abort(self) -> None:
        """The request failed: put back the entry it took, cut to what it
        held when taken (a state that can't be cut back is dropped)."""
        if not self._open:
            return
        self._open = False
        taken, self._taken, self._snapshot = self._taken, None, None
        if taken is None:
            return
        try:
            self._put_back(taken)
        except Exception:  # never raises: the failed request's answer must go out
            log.exception("prompt cache: a failed request's entry could not be put back; dropped")

    def _put_back(self, taken) -> None:
        offset = cache_offset(taken.cache)
        if offset is not None and offset > self.cached:
            if not can_trim_prompt_cache(taken.cache):
                log.info("prompt cache: a failed request's untrimmable state is dropped")
                return
            trim_prompt_cache(taken.cache, offset - self.cached)
        taken.key = taken.key[: self.cached]
        taken.n_prompt = min(taken.n_prompt, self.cached)
        taken.nbytes = cache_nbytes(taken.cache)
        if taken.key:
            self.store.add(taken)


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
        if best is None:
            cache = self._new_cache(keep)
            if self._entries:
                log.info("prompt cache miss (%d tokens): %s", n, reason)
            return Lease(self, cache, 0, step, keep, cache_window(cache), None)
        taken = None
        if best_m > best.n_prompt:
            self._remove(best)  # the request continues that conversation: take it, no copy
            cache = best.cache
            trim_prompt_cache(cache, len(best.key) - best_m)
            taken = best
        else:
            self._touch(best)
            cache = copy.deepcopy(best.cache)
            trim_prompt_cache(cache, len(best.key) - best_m)
            cache = compact(cache)  # the first write then copies only the shared prefix
        log.debug("prompt cache hit: %d of %d tokens", best_m, n)
        return Lease(self, cache, best_m, step, keep, best.window, taken)

    def _insert(self, lease: Lease, prompt, cache: list, fed_back: list[int], stop_reason: str,
                snapshot: Optional[tuple[int, list]]) -> Optional[Entry]:
        key = list(prompt.cache_key) + list(fed_back)
        offset = cache_offset(cache)
        if offset is None:
            if stop_reason == "cancelled":  # can't tell what the state holds
                log.info("prompt cache: not storing a cancelled recurrent state")
                return None
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
            offset, cache = snapshot
            trimmable = can_trim_prompt_cache(cache)
        elif offset > len(key):
            log.info("prompt cache: untrimmable state past the known tokens; not stored")
            return None
        if offset <= 0:
            return None
        entry = Entry(
            key=key[:offset],
            n_prompt=min(offset, len(prompt.cache_key)),
            cache=cache,
            nbytes=cache_nbytes(cache),
            exact_only=not trimmable,
            window=window,
            step=step,
            keep=lease.keep,
        )
        return entry if self.add(entry) else None

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
        for old in list(self._entries):
            redundant = old.key == entry.key or (
                not entry.exact_only
                and len(old.key) < len(entry.key)
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

    def status(self) -> protocol.PromptCacheStatus:
        with self._lock:
            return protocol.PromptCacheStatus(
                entries=len(self._entries),
                bytes=self._bytes,
                max_bytes=self.max_bytes,
                max_entries=self.max_entries,
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
            if c < len(entry.key):
                return 0, (f"the stored state can't be trimmed (recurrent or wrapped window); "
                           f"it covers {len(entry.key)} tokens, the prompt shares {c}")
            if entry.step is not None and entry.step != step:
                return 0, f"the stored state was prefilled in steps of {entry.step}, this request uses {step}"
            return len(entry.key), ""
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
    from . import cache_budget

    max_bytes = params.prompt_cache_bytes
    max_entries = DEFAULT_ENTRIES if params.prompt_cache_entries is None else params.prompt_cache_entries
    if max_bytes == 0 or max_entries == 0:
        return None
    store = PromptCacheStore(max_bytes, max_entries, lambda keep: make_cache(lm, keep))
    cache_budget.budget().attach(store)
    return store

"""The prompt cache's disk tier: entries leave RAM for a folder, and come back.

Evicted entries, and every entry at unload and shutdown, are written once (a
file's name is its content address; written to a temporary name, then
renamed); a prompt whose prefix a file holds beyond what RAM gave reads it
back, checked as ``cache_load`` checks a file. Spec: protocol/README.md
§ Prompt cache on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Optional

import msgspec

from .. import faults, protocol
from ..errors import WorkerError
from .disk_folder import SUFFIX, CacheFile, DiskFolder, file_sha, unlink

log = logging.getLogger("mlx_worker.cache.disk")

# Write-rate bound for evictions (SSD wear under churn): beyond it an evicted
# entry is dropped, not written. Unload and shutdown write everything.
MAX_SPILLS_PER_MINUTE = 60


class DiskTier:
    """Entries to and from files of one folder (``DiskFolder`` keeps its index)."""

    def __init__(self, folder: Path, max_bytes: Optional[int]):
        self.folder = DiskFolder(folder, max_bytes)
        self.hits = self.writes = self.dropped = 0
        self._spills: list[float] = []  # times of recent eviction writes
        self._lock = threading.Lock()

    # ------------------------------------------------------------ naming

    def namespace(self, lm, store) -> str:
        from .files import _kv_meta, model_identity

        parts = {**model_identity(lm), **_kv_meta(lm), "max_kv_size": lm.max_kv_size or 0}
        draft = getattr(store, "draft_lm", None)
        if draft is not None:  # a (target, draft) pair store holds both caches
            parts["draft"] = model_identity(draft)
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    @staticmethod
    def _key_hash(entry) -> str:
        blob = msgspec.json.encode([entry.key, entry.step, entry.keep])
        return hashlib.sha256(blob).hexdigest()[:24]

    # ------------------------------------------------------------ writing

    def spill(self, lm, store, entry) -> bool:
        """An entry evicted from RAM: written unless the write rate is over its bound."""
        import time

        now = time.monotonic()
        self._spills = [t for t in self._spills if now - t < 60.0]
        if len(self._spills) >= MAX_SPILLS_PER_MINUTE:
            self.dropped += 1
            return False
        written = self.write(lm, store, entry)
        if written:
            self._spills.append(now)
        return written

    def write(self, lm, store, entry) -> bool:
        """Write ``entry`` unless it is on disk already; never raises (a full
        disk drops this entry, nothing else)."""
        if not all(isinstance(t, int) for t in entry.key):  # image keys: not written
            return False
        ns = self.namespace(lm, store)
        stem = f"{ns}-{self._key_hash(entry)}-"
        files = self.folder.files(ns)
        if any(f.path.name.startswith(stem) and f.path.exists() for f in files):
            return False
        from mlx_lm.models.cache import save_prompt_cache

        from .files import file_contents

        tmp = self.folder.path / f".{stem}{os.getpid()}-{os.urandom(4).hex()}.tmp{SUFFIX}"
        try:
            faults.hit("spill")
            layers, metadata = file_contents(lm, entry)  # its checkpoints too (checkpoints.py)
            save_prompt_cache(str(tmp), layers, metadata)
            digest = file_sha(tmp)
            path = self.folder.path / f"{stem}{digest[:16]}{SUFFIX}"
            os.replace(tmp, path)
        except Exception as exc:  # a full disk, a folder gone: this entry is dropped
            log.warning("prompt cache: could not write an entry to %s: %s", self.folder.path, exc)
            unlink(tmp)
            return False
        with self._lock:
            self.writes += 1
        # a longer entry of the same conversation serves what a prefix did
        served = [f for f in list(files) if len(f.key) < len(entry.key) and entry.key[: len(f.key)] == f.key
                  and not entry.exact_only]
        self.folder.added(ns, CacheFile(path, list(entry.key), path.stat().st_size), served)
        return True

    # ------------------------------------------------------------ reading

    def best(self, lm, store, key: list, have: int) -> Optional[CacheFile]:
        """The file sharing the longest prefix with ``key`` beyond ``have`` tokens."""
        from .layers import common_prefix

        best, best_m = None, have
        for f in self.folder.files(self.namespace(lm, store)):
            m = common_prefix(f.key, key, len(key) - 1)
            if m > best_m:
                best, best_m = f, m
        return best

    def read(self, lm, store, f: CacheFile):
        """The entry in ``f``, checked; None (and the file removed) if it
        doesn't hold what its name and metadata promise."""
        ns = self.namespace(lm, store)
        entry = None
        try:
            if file_sha(f.path)[:16] != f.path.name[-len(SUFFIX) - 16 : -len(SUFFIX)]:
                problem = "checksum mismatch"
            else:
                entry, problem = _read_entry(lm, store, f), None
        except FileNotFoundError:  # another worker removed it meanwhile
            self.folder.forget(ns, f)
            return None
        except WorkerError as exc:  # another model or KV configuration, or a layout that doesn't fit
            problem = exc.message
        except Exception as exc:
            problem = f"unreadable ({type(exc).__name__})"
        if problem:
            log.warning("prompt cache: ignoring and removing %s: %s", f.path.name, problem)
            self.folder.remove(ns, f)
            return None
        try:
            os.utime(f.path)  # recently used
        except OSError:
            pass
        with self._lock:
            self.hits += 1
        return entry

    def status(self) -> protocol.DiskCacheStatus:
        entries, nbytes = self.folder.usage()
        return protocol.DiskCacheStatus(folder=str(self.folder.path), entries=entries, bytes=nbytes,
                                        max_bytes=self.folder.max_bytes, hits=self.hits, writes=self.writes,
                                        removed=self.folder.removed)


def _read_entry(lm, store, f: CacheFile):
    """The entry a file holds, checked as ``cache_load`` checks it (a
    WorkerError says what doesn't match)."""
    from mlx_lm.models.cache import load_prompt_cache

    from .files import _check_identity, file_entry

    cache, meta = load_prompt_cache(str(f.path), return_metadata=True)
    _check_identity(lm, f.path, meta)  # cache_load's rule: format, model, KV configuration
    if getattr(store, "draft_lm", None) is None:
        return file_entry(lm, f.path, cache, meta, list(f.key), int(meta.get("n_prompt") or len(f.key)))
    return _pair_entry(cache, meta, list(f.key))


# ------------------------------------------------------------ the worker's tiers

_tiers: dict[str, DiskTier] = {}
_default: Optional[tuple[str, Optional[int]]] = None  # --cache-dir, --cache-dir-bytes


def configure(folder: Optional[str], max_bytes: Optional[int]) -> None:
    global _default
    _default = (folder, max_bytes) if folder else None


def tier_for(folder: Optional[str], max_bytes: Optional[int]) -> Optional[DiskTier]:
    """The tier a load asks for (its ``cache_dir``), else the worker's; one per folder."""
    if folder is None:
        if _default is None:
            return None
        folder, max_bytes = _default[0], max_bytes if max_bytes is not None else _default[1]
    path = Path(folder).expanduser().resolve()
    tier = _tiers.get(str(path))
    if tier is None:
        tier = _tiers[str(path)] = DiskTier(path, max_bytes)
    elif max_bytes is not None:
        tier.folder.max_bytes = max_bytes
    return tier


def all_tiers() -> list[DiskTier]:
    return list(_tiers.values())


def _pair_entry(cache: list, meta: dict, key: list):
    """A (target, draft) pair store's entry: both models' plain KV, no
    checkpoints (speculative decoding refuses untrimmable caches)."""
    import mlx.core as mx
    from mlx_lm.models.cache import can_trim_prompt_cache

    from .entry import Entry
    from .layers import DEFAULT_KEEP, cache_nbytes, cache_window

    mx.eval([c.state for c in cache])
    window = cache_window(cache)
    step = meta.get("step")
    return Entry(key=key, n_prompt=int(meta.get("n_prompt") or len(key)), cache=cache,
                 nbytes=cache_nbytes(cache), exact_only=not can_trim_prompt_cache(cache), window=window,
                 step=int(step) if window is not None and step else None, keep=int(meta.get("keep") or DEFAULT_KEEP))


def attach(lm, store, tier: Optional[DiskTier]) -> None:
    """Entries ``store`` evicts from RAM go to ``tier``."""
    if tier is None or store is None:
        return
    import weakref

    ref = weakref.ref(lm)  # no cycle: unload must free the model at once
    store.disk = tier

    def spill(entry) -> None:
        model = ref()
        if model is not None:
            tier.spill(model, store, entry)

    store.on_evict = spill


def spill_all(lm, stores: list) -> int:
    """Write every entry of ``stores`` (unload, shutdown); the count written."""
    written = 0
    for store in stores:
        tier = getattr(store, "disk", None)
        if store is None or tier is None:
            continue
        for entry in store.entries():
            written += tier.write(lm, store, entry)
    return written


def restore(lm, store, key: list, have: int) -> bool:
    """A prefix match on disk longer than the ``have`` tokens RAM gave: read
    it into ``store`` (the caller fetches again). False if none or unusable."""
    tier = getattr(store, "disk", None)
    if tier is None or len(key) < 2:
        return False
    while True:
        f = tier.best(lm, store, key, have)
        if f is None:
            return False
        faults.hit("restore")  # an allocation failure here ends the request (-32005)
        entry = tier.read(lm, store, f)
        if entry is not None:
            return store.add(entry)
        # that file was bad (removed): try the next best

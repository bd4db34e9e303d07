"""The prompt cache's disk tier: entries leave RAM for a folder, and come back.

An entry is written when it is evicted from RAM, and every entry at unload
and at shutdown — never per turn, and once: its file name is its content
address, so an entry already on disk is not written again. A file is
``cache_files``' format (mlx-lm's ``save_prompt_cache``, safetensors, with
the key and the model's identity in its metadata), named

    <namespace>-<key hash>-<sha256 of the file, 16 hex>.safetensors

where the namespace hashes the model's content identity and its KV
configuration (kv_bits, group, max_kv_size, the draft of a pair store). It is
written to a temporary name in the same folder and renamed (atomic: a reader
never sees half a file; two workers writing the same entry write the same
bytes). A file whose checksum, format, identity or layout doesn't match is
ignored and removed; another namespace's files are left alone (another model,
another worker). The folder holds at most ``max_bytes``: least recently
used files (by mtime, refreshed on a hit) go first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import msgspec

from .. import faults, protocol
from ..errors import WorkerError

log = logging.getLogger("mlx_worker.cache.disk")

SUFFIX = ".safetensors"
DEFAULT_FRACTION_OF_FREE = 0.1  # of the folder's free space when first used
DEFAULT_MAX = 16 << 30
# Write-rate bound for evictions (SSD wear under churn): beyond it an evicted
# entry is dropped, not written. Unload and shutdown write everything.
MAX_SPILLS_PER_MINUTE = 60


@dataclass
class _File:
    path: Path
    key: list
    nbytes: int


class DiskTier:
    def __init__(self, folder: Path, max_bytes: Optional[int]):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        if max_bytes is None:
            st = os.statvfs(folder)
            max_bytes = min(DEFAULT_MAX, int(st.f_bavail * st.f_frsize * DEFAULT_FRACTION_OF_FREE))
        self.max_bytes = max_bytes
        self.hits = self.writes = self.removed = self.dropped = 0
        self._spills: list[float] = []  # times of recent eviction writes
        self._index: dict[str, list[_File]] = {}  # namespace -> its files (read lazily)
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
        files = self._files(ns, lm, store)
        if any(f.path.name.startswith(stem) and f.path.exists() for f in files):
            return False
        from mlx_lm.models.cache import save_prompt_cache

        from .files import file_contents

        tmp = self.folder / f".{stem}{os.getpid()}-{os.urandom(4).hex()}.tmp{SUFFIX}"
        try:
            faults.hit("spill")
            layers, metadata = file_contents(lm, entry)  # its checkpoints too (checkpoints.py)
            save_prompt_cache(str(tmp), layers, metadata)
            digest = _file_sha(tmp)
            path = self.folder / f"{stem}{digest[:16]}{SUFFIX}"
            os.replace(tmp, path)
        except Exception as exc:  # a full disk, a folder gone: this entry is dropped
            log.warning("prompt cache: could not write an entry to %s: %s", self.folder, exc)
            _unlink(tmp)
            return False
        size = path.stat().st_size
        with self._lock:
            self.writes += 1
            # a longer entry of the same conversation serves what a prefix did
            for f in list(files):
                if len(f.key) < len(entry.key) and entry.key[: len(f.key)] == f.key and not entry.exact_only:
                    self._remove(ns, f)
            self._index[ns].append(_File(path, list(entry.key), size))
        self._trim()
        return True

    def _trim(self) -> None:
        """Keep the folder under max_bytes: oldest files (mtime) first."""
        try:
            files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.folder.glob(f"*{SUFFIX}")
                     if not p.name.startswith(".")]
        except OSError:
            return
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            _unlink(path)
            total -= size
            with self._lock:
                for ns, entries in self._index.items():
                    self._index[ns] = [f for f in entries if f.path != path]

    # ------------------------------------------------------------ reading

    def best(self, lm, store, key: list, have: int) -> Optional[_File]:
        """The file sharing the longest prefix with ``key`` beyond ``have`` tokens."""
        from .store import common_prefix

        ns = self.namespace(lm, store)
        best, best_m = None, have
        for f in self._files(ns, lm, store):
            m = common_prefix(f.key, key, len(key) - 1)
            if m > best_m:
                best, best_m = f, m
        return best

    def read(self, lm, store, f: _File):
        """The entry in ``f``, checked; None (and the file removed) if it
        doesn't hold what its name and metadata promise."""
        from mlx_lm.models.cache import load_prompt_cache

        from .files import _check_identity, file_entry

        ns = self.namespace(lm, store)
        problem = entry = None
        try:
            if _file_sha(f.path)[:16] != f.path.name[-len(SUFFIX) - 16 : -len(SUFFIX)]:
                problem = "checksum mismatch"
            else:
                cache, meta = load_prompt_cache(str(f.path), return_metadata=True)
                _check_identity(lm, f.path, meta)  # cache_load's rule: format, model, KV configuration
                if getattr(store, "draft_lm", None) is None:
                    entry = file_entry(lm, f.path, cache, meta, list(f.key), int(meta.get("n_prompt") or len(f.key)))
                else:
                    entry = _pair_entry(cache, meta, list(f.key))
        except FileNotFoundError:  # another worker removed it meanwhile
            self._forget(ns, f)
            return None
        except WorkerError as exc:  # another model or KV configuration, or a layout that doesn't fit
            problem = exc.message
        except Exception as exc:
            problem = f"unreadable ({type(exc).__name__})"
        if problem:
            log.warning("prompt cache: ignoring and removing %s: %s", f.path.name, problem)
            with self._lock:
                self._remove(ns, f)
            return None
        try:
            os.utime(f.path)  # recently used
        except OSError:
            pass
        with self._lock:
            self.hits += 1
        return entry

    # ------------------------------------------------------------ index

    def _files(self, ns: str, lm, store) -> list[_File]:
        with self._lock:
            known = self._index.get(ns)
        if known is not None:
            return known
        found = []
        for path in sorted(self.folder.glob(f"{ns}-*{SUFFIX}")):
            key = _header_key(path)
            if key is None:
                log.warning("prompt cache: ignoring and removing %s: not a readable cache file", path.name)
                _unlink(path)
                with self._lock:
                    self.removed += 1
                continue
            try:
                found.append(_File(path, key, path.stat().st_size))
            except OSError:
                continue
        with self._lock:
            self._index[ns] = found
        return found

    def _remove(self, ns: str, f: _File) -> None:
        _unlink(f.path)
        self.removed += 1
        self._index[ns] = [x for x in self._index.get(ns, []) if x is not f]

    def _forget(self, ns: str, f: _File) -> None:
        with self._lock:
            self._index[ns] = [x for x in self._index.get(ns, []) if x is not f]

    def status(self) -> protocol.DiskCacheStatus:
        entries = nbytes = 0
        try:
            for p in self.folder.glob(f"*{SUFFIX}"):
                if not p.name.startswith("."):
                    entries += 1
                    nbytes += p.stat().st_size
        except OSError:
            pass
        return protocol.DiskCacheStatus(folder=str(self.folder), entries=entries, bytes=nbytes,
                                        max_bytes=self.max_bytes, hits=self.hits, writes=self.writes,
                                        removed=self.removed)


def _header_key(path: Path) -> Optional[list]:
    """The token key from a safetensors header's metadata, without reading the tensors."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n < 64 << 20:
                return None
            header = json.loads(fh.read(n))
        key = json.loads(header["__metadata__"]["0.key"])  # save_prompt_cache flattens [metadata, …]
        return key if isinstance(key, list) and key else None
    except Exception:
        return None


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


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
        tier.max_bytes = max_bytes
    return tier


def all_tiers() -> list[DiskTier]:
    return list(_tiers.values())


def _pair_entry(cache: list, meta: dict, key: list):
    """A (target, draft) pair store's entry: both models' plain KV, no
    checkpoints (speculative decoding refuses untrimmable caches)."""
    import mlx.core as mx
    from mlx_lm.models.cache import can_trim_prompt_cache

    from .store import DEFAULT_KEEP, Entry, cache_nbytes, cache_window

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

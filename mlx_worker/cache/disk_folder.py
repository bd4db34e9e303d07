"""The disk tier's folder: its cache files by namespace, kept under a byte budget.

Files are found by name and read lazily from their safetensors headers (the
token key only); the least recently used (by mtime) go first when the folder
is over its budget. Spec: protocol/README.md § Prompt cache on disk.
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

log = logging.getLogger("mlx_worker.cache.disk")

SUFFIX = ".safetensors"
DEFAULT_FRACTION_OF_FREE = 0.1  # of the folder's free space when first used
DEFAULT_MAX = 16 << 30


@dataclass
class CacheFile:
    path: Path
    key: list
    nbytes: int


class DiskFolder:
    def __init__(self, folder: Path, max_bytes: Optional[int]):
        self.path = folder
        folder.mkdir(parents=True, exist_ok=True)
        if max_bytes is None:
            st = os.statvfs(folder)
            max_bytes = min(DEFAULT_MAX, int(st.f_bavail * st.f_frsize * DEFAULT_FRACTION_OF_FREE))
        self.max_bytes = max_bytes
        self.removed = 0
        self._index: dict[str, list[CacheFile]] = {}  # namespace -> its files (read lazily)
        self._lock = threading.Lock()

    def files(self, ns: str) -> list[CacheFile]:
        """The namespace's files (a file whose header can't be read is removed)."""
        with self._lock:
            known = self._index.get(ns)
        if known is not None:
            return known
        found = []
        for path in sorted(self.path.glob(f"{ns}-*{SUFFIX}")):
            key = _header_key(path)
            if key is None:
                log.warning("prompt cache: ignoring and removing %s: not a readable cache file", path.name)
                unlink(path)
                with self._lock:
                    self.removed += 1
                continue
            try:
                found.append(CacheFile(path, key, path.stat().st_size))
            except OSError:
                continue
        with self._lock:
            self._index[ns] = found
        return found

    def added(self, ns: str, f: CacheFile, replaced: list[CacheFile]) -> None:
        """``f`` was written; ``replaced`` (files it serves) are removed; the folder is trimmed."""
        with self._lock:
            for old in replaced:
                self._remove(ns, old)
            self._index[ns].append(f)
        self._trim()

    def remove(self, ns: str, f: CacheFile) -> None:
        with self._lock:
            self._remove(ns, f)

    def forget(self, ns: str, f: CacheFile) -> None:
        """``f`` is gone already (another worker removed it)."""
        with self._lock:
            self._index[ns] = [x for x in self._index.get(ns, []) if x is not f]

    def usage(self) -> tuple[int, int]:
        """(files, bytes) in the folder, every namespace's."""
        entries = nbytes = 0
        try:
            for p in self.path.glob(f"*{SUFFIX}"):
                if not p.name.startswith("."):
                    entries += 1
                    nbytes += p.stat().st_size
        except OSError:
            pass
        return entries, nbytes

    def _remove(self, ns: str, f: CacheFile) -> None:
        unlink(f.path)
        self.removed += 1
        self._index[ns] = [x for x in self._index.get(ns, []) if x is not f]

    def _trim(self) -> None:
        """Keep the folder under max_bytes: oldest files (mtime) first."""
        try:
            files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.path.glob(f"*{SUFFIX}")
                     if not p.name.startswith(".")]
        except OSError:
            return
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            unlink(path)
            total -= size
            with self._lock:
                for ns, entries in self._index.items():
                    self._index[ns] = [f for f in entries if f.path != path]


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


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass

"""Vision-tower outputs kept by image content hash (never by path)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import mlx.core as mx

DEFAULT_IMAGE_CACHE_BYTES = 256 * 1024 * 1024


@dataclass
class Features:
    grid: tuple[int, ...]  # the processor's grid for the image (t, h, w for Qwen)
    values: mx.array  # (image tokens, hidden): lazy until its tower's pieces ran
    pending: list = field(default_factory=list)  # those pieces, while not all ran (tower_pieces.py)


class FeatureCache:
    """LRU of image features, bounded in bytes; 0 bytes disables it."""

    def __init__(self, max_bytes: int = DEFAULT_IMAGE_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Features] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, sha256: str) -> Features | None:
        entry = self._entries.get(sha256)
        if entry is not None:
            self._entries.move_to_end(sha256)
        return entry

    def put(self, sha256: str, features: Features) -> None:
        size = features.values.nbytes
        if size > self.max_bytes:
            return
        old = self._entries.pop(sha256, None)
        if old is not None:
            self._bytes -= old.values.nbytes
        self._entries[sha256] = features
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.values.nbytes

    def drop(self, sha256: str, entry: Features) -> None:
        """Forget ``entry`` (its tower failed), unless another took its place."""
        if self._entries.get(sha256) is entry:
            del self._entries[sha256]
            self._bytes -= entry.values.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

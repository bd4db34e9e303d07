"""Memory figures for `status`: MLX's allocator and the process's RSS."""

from __future__ import annotations

import os
import sys

from . import protocol


def rss_bytes() -> int:
    """Resident set size now (not the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:  # macOS: ru_maxrss is the peak, in bytes; the best cheap figure there
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except Exception:
        return 0


def memory_status(limit: int | None = None) -> protocol.MemoryStatus:
    import mlx.core as mx

    return protocol.MemoryStatus(
        active=mx.get_active_memory(),
        peak=mx.get_peak_memory(),
        cache=mx.get_cache_memory(),
        rss=rss_bytes(),
        limit=limit,
    )

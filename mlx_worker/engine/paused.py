"""A preempted request's KV, out of memory until it resumes.

The scheduler pauses the youngest decoding request when the running
requests' KV no longer fits the memory limit (a limit lowered by
``set_limits``, memory taken meanwhile). Its cache goes to a private file in
the prompt cache's disk folder (mlx-lm's ``save_prompt_cache``: every cache
type round-trips bit for bit), so resuming continues exactly where it
stopped: the same tokens as an uninterrupted run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx


@dataclass
class Paused:
    path: Path
    y: list  # the pending token (sampled, not yet read)
    lp: Optional[mx.array]  # its logprobs (one vocab row: small, kept in memory)
    nbytes: int  # the KV written out

    def restore(self) -> tuple[list, mx.array, Optional[mx.array]]:
        from mlx_lm.models.cache import load_prompt_cache

        cache = load_prompt_cache(str(self.path))
        mx.eval([c.state for c in cache])
        self.drop()
        return cache, mx.array(self.y, dtype=mx.uint32), self.lp

    def drop(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass


def stash(folder: Path, cache: list, y: mx.array, lp: Optional[mx.array]) -> Paused:
    """Write ``cache`` out; raises OSError when it can't (the caller keeps it)."""
    from mlx_lm.models.cache import save_prompt_cache

    from ..cache.store import cache_nbytes

    path = folder / f".paused-{os.getpid()}-{os.urandom(6).hex()}.safetensors"
    try:
        save_prompt_cache(str(path), cache, {})
    except Exception as exc:
        try:
            path.unlink()
        except OSError:
            pass
        raise OSError(f"could not write the paused request's KV: {exc}") from exc
    return Paused(path, y.tolist(), lp, cache_nbytes(cache))

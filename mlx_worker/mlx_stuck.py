"""A thread left waiting inside MLX for good: the compute thread, in a
collective MLX's ring backend never resolves (distributed/ring.py watches for
it). Nothing can free it, and MLX can't be trusted to evaluate anything more in
the process (its eval waits while over 10 tasks are in flight on any stream),
so the server answers every request in flight, stops as on shutdown and exits
with EXIT_CODE. Spec: "Distributed models".
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

log = logging.getLogger("mlx_worker")

EXIT_CODE = 70  # EX_SOFTWARE: the host restarts the worker
reason: Optional[str] = None
_on_declare: Optional[Callable[[str], None]] = None


def on_declare(stop: Callable[[str], None]) -> None:
    """How the server answers and stops (registered once it runs)."""
    global _on_declare
    _on_declare = stop


def declare(why: str) -> None:
    """From a thread other than the stuck one (the ring's watchdog)."""
    global reason
    if reason is not None:
        return
    reason = why
    log.critical("%s: the worker answers what it holds and exits with code %d", why, EXIT_CODE)
    if _on_declare is not None:
        _on_declare(why)

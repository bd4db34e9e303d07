"""Fault injection for tests: ``MLX_WORKER_FAULTS="prefill@2,decode@3,join@1,restore@1,selfcheck@1,spill@1"``
makes the 2nd prefill chunk (or image-tower turn), the 3rd decode sample, the
1st join into a batch (a speculative request, a vision row's first step), the
1st disk restore, the 1st packed-pass self-check fail as an allocation failure
(MemoryError) and the 1st disk write as a full disk (ENOSPC); ``ring@n``
loses rank 1 before rank 0's nth distributed forward (distributed/mirror.py).
Unset (every real run): ``hit`` is one lookup.
Spec: protocol/README.md § Reliability: limits, bad input, faults, memory.
"""

from __future__ import annotations

import errno
import os

POINTS = ("prefill", "decode", "join", "restore", "selfcheck", "spill", "ring")


def _parse(spec: str) -> dict[str, set[int]]:
    plan: dict[str, set[int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, nth = item.partition("@")
        if point in POINTS and nth.isdigit():
            plan.setdefault(point, set()).add(int(nth))
    return plan


_plan = _parse(os.environ.get("MLX_WORKER_FAULTS", ""))
_counts: dict[str, int] = {}


def fires(point: str) -> bool:
    """Whether this visit of ``point`` is one the plan names."""
    if point not in _plan:
        return False
    _counts[point] = _counts.get(point, 0) + 1
    return _counts[point] in _plan[point]


def hit(point: str) -> None:
    if fires(point):
        if point == "spill":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        raise MemoryError(f"injected allocation failure in {point}")

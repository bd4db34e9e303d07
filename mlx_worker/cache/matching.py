"""How much of a prompt's token key a stored entry can serve.

Spec: protocol/README.md § Prompt cache (§ Rotating caches and other
untrimmable state).
"""

from __future__ import annotations

from .entry import Entry
from .layers import common_prefix


def usable(entry: Entry, key: list, step: int, keep: int) -> tuple[int, str]:
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


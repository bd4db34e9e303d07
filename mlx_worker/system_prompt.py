"""What the prompt cache keeps of a chat: where its system prompt ends in its tokens.

The prompt layer renders; the cache store only ever sees token counts and
keys (spec: protocol/README.md § Prompt cache, § Rotating caches and other
untrimmable state).
"""

from __future__ import annotations

import msgspec

from .cache.layers import DEFAULT_KEEP, common_prefix, rotating_keep
from .errors import WorkerError
from .prompt import encode_text, render_chat


def keep_for(lm, params, tokens: list[int]) -> int:
    """How many leading tokens a rotating cache keeps when it wraps: the
    system prompt's, for a chat that starts with system messages
    (``layers.rotating_keep`` bounds it)."""
    if not lm.max_kv_size:
        return DEFAULT_KEEP
    n_system = _leading_system(params)
    return rotating_keep(lm.max_kv_size, _system_tokens(lm, params, n_system, tokens) if n_system else 0)


def system_end(lm, params, tokens: list[int]) -> int:
    """Where a chat's leading system/developer messages end in its tokens (0:
    none, or nothing after them): other conversations with the same system
    prompt share that prefix, so a stateful cache checkpoints it."""
    n_system = _leading_system(params)
    if not n_system or n_system == len(params.messages):
        return 0
    return _system_tokens(lm, params, n_system, tokens)


def _leading_system(params) -> int:
    """How many messages open the chat as system/developer ones (0 for a
    text prompt). A vision prompt's images change its tokens: not counted."""
    messages = getattr(params, "messages", None)
    n = 0
    while messages and n < len(messages) and messages[n].role in ("system", "developer"):
        n += 1
    return n


def _system_tokens(lm, params, n_system: int, tokens: list[int]) -> int:
    if lm.vision is not None:
        return 0
    head = msgspec.structs.replace(params, messages=params.messages[:n_system], add_generation_prompt=False)
    try:
        system = encode_text(lm, render_chat(lm, head), add_special_tokens=False)
    except WorkerError:
        return 0
    return common_prefix(system, tokens, len(system))

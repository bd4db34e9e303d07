"""The checks every method taking ``tools`` makes (generate, tokenize,
cache_save), before any template sees them; no MLX, so prompt preparation
imports it without loading the grammar machinery. Spec: protocol/README.md § Input.
"""

from __future__ import annotations

import json
from typing import Optional

import msgspec

from .. import protocol
from ..errors import invalid_params


def check_tools(tools: Optional[list[protocol.Tool]]) -> None:
    """What every method taking ``tools`` refuses (-32602): a name given
    twice, and ``parameters`` that are not an object schema (a call's
    arguments are an object: a string or integer schema would make the
    grammar write bare values where the family's syntax and the template
    expect an object)."""
    seen = set()
    for i, t in enumerate(tools or []):
        if t.function.name in seen:
            raise invalid_params(f"params.tools[{i}].function.name", f"tool name {t.function.name!r} is given twice")
        seen.add(t.function.name)
        kind = (t.function.parameters or {}).get("type", "object")
        if kind != "object" and kind != ["object"]:
            raise invalid_params(
                f"params.tools[{i}].function.parameters",
                f"a tool's parameters must be an object schema (type \"object\"), not type {json.dumps(kind)}",
            )


def tool_dicts(tools: Optional[list[protocol.Tool]]) -> Optional[list[dict]]:
    """Tools as the chat template (and the family's tool parser) sees them:
    ``{"type": "function", "function": {name, description, parameters}}``,
    unset fields left out."""
    if tools is None:
        return None
    return [{"type": t.type, "function": msgspec.to_builtins(t.function)} for t in tools]

"""The text of each tool call -> ``ToolCall`` (parsed) or ``InvalidToolCall``.

Parsing is the family's own parser from ``mlx_lm/tool_parsers`` (the one
mlx-lm's ``TokenizerWrapper.tool_parser`` picked for the model). A call that
the output cut short is never parsed: it is reported as incomplete.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from . import protocol
from .channels import CallText


def new_id() -> str:
    return "call_" + os.urandom(12).hex()


def collect(
    tokenizer,
    calls: list[CallText],
    ended_by_eos: bool,
    tools: Optional[list[dict]],
) -> tuple[list[protocol.ToolCall], list[protocol.InvalidToolCall]]:
    """Sort the calls of one output into parsed and invalid ones. A call
    whose family has no end marker is complete when another call or EOS
    ended it."""
    parsed: list[protocol.ToolCall] = []
    invalid: list[protocol.InvalidToolCall] = []
    ends_without_marker = not getattr(tokenizer, "tool_call_end", None)
    for i, call in enumerate(calls):
        last = i == len(calls) - 1
        complete = call.closed or (last and ends_without_marker and ended_by_eos)
        if not complete:
            invalid.append(protocol.InvalidToolCall(
                id=new_id(), text=call.text, reason="incomplete",
                error="the output ended inside this call (max_tokens, a stop string or cancel)",
            ))
            continue
        try:
            result: Any = tokenizer.tool_parser(call.text, tools)
        except Exception as exc:  # each parser raises its own errors (ValueError, JSONDecodeError, ...)
            invalid.append(protocol.InvalidToolCall(
                id=new_id(), text=call.text, reason="unparsable", error=f"{type(exc).__name__}: {exc}"
            ))
            continue
        for item in result if isinstance(result, list) else [result]:
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str):
                invalid.append(protocol.InvalidToolCall(
                    id=new_id(), text=call.text, reason="unparsable", error="the parser found no function name"
                ))
                continue
            arguments = item.get("arguments", {})
            if isinstance(arguments, str):  # some families write arguments as a JSON string
                try:
                    arguments = json.loads(arguments)
                except (ValueError, RecursionError):
                    pass
            call_id = item.get("id") if isinstance(item.get("id"), str) else new_id()
            parsed.append(protocol.ToolCall(id=call_id, name=name, arguments=arguments))
    return parsed, invalid

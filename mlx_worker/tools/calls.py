"""The text of each tool call -> ``ToolCall`` (parsed) or ``InvalidToolCall``.

Parsing is the format's parser (mlx-lm's own where it has one). A call the
output cut short is reported as incomplete, never parsed. Ids are in the
family's format (a Mistral template accepts only 9 alphanumerics).
Spec: protocol/README.md § Tools and reasoning: channels, tool calls, `tool_choice` (§ Result).
"""

from __future__ import annotations

from typing import Any, Optional

from .. import protocol
from .channels import CallText
from . import formats
from .base import loads_args, new_call_id


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
    fmt = formats.format_of(tokenizer)
    new_id = fmt.new_id if fmt is not None else new_call_id
    ends_without_marker = not getattr(tokenizer, "tool_call_end", None) or (fmt is not None and fmt.eos_ends_call)
    calls = [c for c in calls if c.text.strip() or not c.closed]  # a header closed with no call in it
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
            result: Any = fmt.parse(call.text, tools) if fmt is not None else tokenizer.tool_parser(call.text, tools)
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
            arguments = loads_args(item.get("arguments", {}))  # some families write arguments as a JSON string
            call_id = item.get("id") if isinstance(item.get("id"), str) else new_id()
            parsed.append(protocol.ToolCall(id=call_id, name=name, arguments=arguments))
    return parsed, invalid

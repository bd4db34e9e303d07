"""tool_choice -> a logits processor that makes tool calls valid by construction.

With tools given, the output is free until the model writes the family's
call start marker; from there it is held to exactly the family's call syntax
around one of the tools' names and that tool's ``parameters`` schema, then
it is free again (llguidance's lazy "structural tag" idea, run as
``tool_processor.ToolCallProcessor`` so that free text costs no CPU work).
``required`` / ``{name}`` make the call start at the first token; ``none``
only forbids the start marker. The call grammar is compiled and matched by
the constraint machinery (``mlx_worker.constraints``): same cache, same
mask, same fail-closed errors (-32007).

Call syntaxes are known per mlx-lm tool parser (the family's format):

- ``json_tools`` (Qwen, Hermes): ``<tool_call>\\n{"name": "N", "arguments": ARGS}\\n</tool_call>``
- ``mistral``: ``[TOOL_CALLS]N[ARGS]ARGS`` (no end marker; a call ends at the
  next call or EOS)

Start and end markers must be single tokens (they are in these families).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx

from . import errors, protocol
from .errors import WorkerError, invalid_params

FIELD = "params.tools"
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass
class CallSyntax:
    trigger_id: int  # the start marker (one token)
    trigger: str  # lark for the start marker
    before_name: str
    after_name: str
    after_args: str
    free_after: bool  # text may follow a call


def family_of(tokenizer) -> Optional[str]:
    parser = getattr(tokenizer, "tool_parser", None)
    return parser.__module__.rsplit(".", 1)[-1] if parser is not None else None


def _single_token(ids) -> Optional[int]:
    return ids[0] if ids is not None and len(ids) == 1 else None


def _special(token_id: int) -> str:
    return f"<[{token_id}]>"


def _lit(text: str) -> str:
    return json.dumps(text) if text else ""


def syntax_for(tokenizer) -> Optional[CallSyntax]:
    family = family_of(tokenizer)
    start = _single_token(getattr(tokenizer, "tool_call_start_tokens", None))
    if start is None:
        return None
    if family == "json_tools":
        end = _single_token(tokenizer.tool_call_end_tokens)
        if end is None:
            return None
        after_args = _lit("}\n") + " " + _special(end)
        return CallSyntax(start, _special(start), _lit('\n{"name": "'), _lit('", "arguments": '),
                          after_args, free_after=True)
    if family == "mistral":
        args = tokenizer.encode("[ARGS]", add_special_tokens=False)
        sep = _special(args[0]) if len(args) == 1 else _lit("[ARGS]")
        return CallSyntax(start, _special(start), "", sep, "", free_after=False)
    return None


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


def chosen_tools(params: protocol.GenerateParams) -> tuple[str, list[protocol.Tool]]:
    """(mode, tools the grammar may call); mode is auto | required | none."""
    tools = params.tools or []
    check_tools(tools)
    choice = params.tool_choice
    if isinstance(choice, protocol.NamedToolChoice):
        names = {n for n in (choice.name, choice.function.name if choice.function else None) if n}
        if len(names) != 1:
            raise invalid_params("params.tool_choice", "tool_choice names exactly one tool: {\"name\": ...}")
        name = names.pop()
        picked = [t for t in tools if t.function.name == name]
        if not picked:
            raise invalid_params("params.tool_choice", f"tool_choice names {name!r}, which is not in `tools`")
        return "required", picked
    if choice == "required" and not tools:
        raise invalid_params("params.tool_choice", 'tool_choice "required" needs `tools`')
    return choice, tools


def processor_for(lm, params: protocol.GenerateParams):
    """The logits processor for ``tool_choice``, or None when nothing is
    constrained (no tools, or auto/none on a model without tool calls)."""
    mode, tools = chosen_tools(params)
    tok = lm.tokenizer
    if mode == "none":
        start = getattr(tok, "tool_call_start_tokens", None)
        if not getattr(tok, "has_tool_calling", False):
            return None
        if start is None or len(start) != 1:
            raise _refuse("tool_choice \"none\" can't be enforced: this model's tool-call start marker is not one token",
                          "params.tool_choice")
        return _forbid(start[0])
    if not tools:
        return None
    if params.constraint is not None:
        raise invalid_params("params.constraint", "`constraint` can't be combined with `tools` unless tool_choice is \"none\"")
    syntax = syntax_for(tok)
    if syntax is None:
        family = family_of(tok) or "none detected"
        raise _refuse(
            f"tool calls of this model can't be constrained (tool-call format: {family}); "
            'send tool_choice "none" to render tools without calls',
            FIELD, tool_call_format=family_of(tok),
        )
    from . import constraints

    for i, t in enumerate(tools):  # precise errors, per tool, from the shared compile cache
        try:
            constraints.compile_for(lm, protocol.JsonSchemaConstraint(schema=_schema(t)))
        except WorkerError as exc:
            raise _refuse(exc.message, f"params.tools[{i}].function.parameters") from None
    lark = call_grammar(syntax, tools)
    try:
        compiled = constraints.compile_for(lm, protocol.GrammarConstraint(lark=lark))
    except WorkerError as exc:
        raise _refuse(exc.message, FIELD) from None
    from .tool_processor import ToolCallProcessor

    return ToolCallProcessor(
        compiled.program, compiled.info, syntax.trigger_id,
        first="call_only" if mode == "required" else "free",
        after_call="free" if syntax.free_after else "call_or_end",
    )


def call_grammar(syntax: CallSyntax, tools: list[protocol.Tool]) -> str:
    """One call, start marker included: one of the tools' names and its
    arguments, in the family's syntax."""
    from .constraints.llguidance_engine import JSON_OPTIONS, JSON_OVERRIDES

    lines = [
        "%llguidance {}",
        "start: " + syntax.trigger + " (" + " | ".join(f"tool_{i}" for i in range(len(tools))) + ")",
    ]
    for i, t in enumerate(tools):
        schema = dict(_schema(t))
        schema["x-guidance"] = {**JSON_OPTIONS, **schema.get("x-guidance", {}), **JSON_OVERRIDES}
        parts = [syntax.before_name, _lit(t.function.name), syntax.after_name, f"args_{i}", syntax.after_args]
        lines.append(f"tool_{i}: " + " ".join(p for p in parts if p))
        lines.append(f"args_{i}: %json " + json.dumps(schema))
    return "\n".join(lines) + "\n"


def _schema(tool: protocol.Tool) -> Any:
    """The schema a call's arguments are held to: always an object (a schema
    without a ``type``, ``{}`` included, is one for an object)."""
    parameters = tool.function.parameters
    if parameters is None:
        return NO_PARAMETERS
    return parameters if "type" in parameters else {**parameters, "type": "object"}


def is_call_grammar(processor) -> bool:
    """True for a processor that holds calls to a grammar (not the start
    marker ban of "none")."""
    from .tool_processor import ToolCallProcessor

    return isinstance(processor, ToolCallProcessor)


def _forbid(token: int):
    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        logits[..., token] = -float("inf")
        return logits

    return processor


def _refuse(message: str, field: str, **data: Any) -> WorkerError:
    return WorkerError(errors.CONSTRAINT_INVALID, message, {"field": field, **data})

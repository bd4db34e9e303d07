"""tool_choice -> a logits processor that makes tool calls valid by construction.

Free until the model starts a call (the format's trigger; free text costs no
work over the vocabulary: ``processor.ToolCallProcessor``); from there held to
the family's call syntax around a tool's name and ``parameters`` schema, then
free again. ``required`` / ``{name}`` start a call at the first token;
``none`` forbids the start. Compiled and matched by ``mlx_worker.constraints``
(same cache, mask, -32007 errors). Spec: protocol/README.md § `tool_choice`.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .. import errors, protocol
from ..errors import WorkerError, invalid_params
from .checks import tool_dicts
from . import formats
from .base import Vocab, schema_of
from .checks import check_tools

FIELD = "params.tools"


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
    fmt = formats.format_of(tok)
    if mode == "none":
        if fmt is None:
            return None
        return _forbid_calls(lm, fmt)
    if not tools:
        return None
    if params.constraint is not None:
        raise invalid_params("params.constraint", "`constraint` can't be combined with `tools` unless tool_choice is \"none\"")
    if fmt is None:
        raise _refuse(
            "tool calls of this model can't be constrained (no tool-call format detected from its chat template "
            'and vocabulary); send tool_choice "none" to render tools without calls',
            FIELD, tool_call_format=None,
        )
    from .. import constraints

    for i, t in enumerate(tools):  # precise errors, per tool, from the shared compile cache
        try:
            constraints.compile_for(lm, protocol.JsonSchemaConstraint(schema=_schema(t)))
        except WorkerError as exc:
            raise _refuse(exc.message, f"params.tools[{i}].function.parameters") from None
    v = Vocab(tok)
    lark = call_grammar(fmt, v, tool_dicts(tools), "call" if mode == "required" else "auto", params.parallel_tool_calls)
    compiled = _compile(lm, lark)
    from .processor import ToolCallProcessor

    trigger = v.token(fmt.start) if fmt.start else None
    return ToolCallProcessor(
        compiled.program, compiled.info, trigger,
        first="call_only" if mode == "required" else "free",
        after_call=fmt.after_call if params.parallel_tool_calls else _single(fmt.after_call),
        opens=_opens(tok, fmt), is_text=_is_text(tok, fmt),
    )


def call_grammar(fmt, v: Vocab, tools: list[dict], mode: str = "auto", parallel: bool = True) -> str:
    """One call (or call section), start marker included, in the format's syntax."""
    return "%llguidance {}\n" + "\n".join(fmt.rules(v, tools, mode, parallel)) + "\n"


def _single(after_call: str) -> str:
    """parallel_tool_calls false: no second call after the first."""
    return {"free": "no_call", "call_or_end": "end"}.get(after_call, after_call)


def _compile(lm, lark: str):
    from .. import constraints

    try:
        return constraints.compile_for(lm, protocol.GrammarConstraint(lark=lark))
    except WorkerError as exc:
        raise _refuse(exc.message, FIELD) from None


def _forbid_calls(lm, fmt):
    """tool_choice "none": the format's start can't be written."""
    v = Vocab(lm.tokenizer)
    if fmt.none_needs_grammar:
        from .processor import ToolCallProcessor

        compiled = _compile(lm, call_grammar(fmt, v, [], "none"))
        trigger = v.token(fmt.start) if fmt.start else None
        return ToolCallProcessor(compiled.program, compiled.info, trigger, first="free",
                                 after_call="free", opens=_opens(lm.tokenizer, fmt))
    if fmt.start:
        tid = v.token(fmt.start)
        if tid is None:
            raise _refuse("tool_choice \"none\" can't be enforced: this model's tool-call start marker is not one token",
                          "params.tool_choice")
        return _forbid([tid])
    return _forbid_first(formats.lead_tokens(lm, fmt))


def _opens(tokenizer, fmt):
    """The prompt ends with the format's ``open_text`` (read from its last tokens)."""
    if not fmt.open_text:
        return None
    import numpy as np

    def opens(tokens) -> bool:
        tail = [int(t) for t in np.asarray(tokens[-8:])]
        return tokenizer.decode(tail).endswith(fmt.open_text)

    return opens


def _is_text(tokenizer, fmt):
    """The grammar's tokens were the format's text header (``text_lead``)."""
    if not fmt.text_lead:
        return None
    return lambda tokens: tokenizer.decode(tokens) == fmt.text_lead


def _schema(tool: protocol.Tool) -> Any:
    return schema_of({"function": {"parameters": tool.function.parameters}})


def is_call_grammar(processor) -> bool:
    """True for a processor that holds calls to a grammar (not the start
    marker ban of "none")."""
    from .processor import ToolCallProcessor

    return isinstance(processor, ToolCallProcessor)


def _forbid(tokens: list[int]):
    def processor(ids: mx.array, logits: mx.array) -> mx.array:
        logits[..., tokens] = -float("inf")
        return logits

    return processor


def _forbid_first(tokens: list[int]):
    """No call at the start of the output (a format without a start marker)."""
    prompt: dict = {}

    def processor(ids: mx.array, logits: mx.array) -> mx.array:
        # The first call sees the prompt; the output's first token is the
        # one sampled from logits over exactly that many tokens.
        length = prompt.setdefault("length", ids.shape[-1])
        if ids.shape[-1] <= length and tokens:
            logits[..., tokens] = -float("inf")
        return logits

    return processor


def _refuse(message: str, field: str, **data: Any) -> WorkerError:
    return WorkerError(errors.CONSTRAINT_INVALID, message, {"field": field, **data})

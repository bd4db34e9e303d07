"""What a tool-call format is: one family's calls as its template renders them.

A ``Format`` detects its family (chat template text, vocabulary), gives the
Lark grammar of one call (each tool's ``parameters`` schema for the
arguments), parses the call text back, and knows the reasoning markers and
the ids the family's template accepts. Spec: protocol/README.md § Formats (families).
"""

from __future__ import annotations

import json
import secrets
import string
from typing import Any, Optional

NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
ALNUM = string.ascii_letters + string.digits


def lit(text: str) -> str:
    """A Lark string literal (empty text: nothing)."""
    return json.dumps(text) if text else ""


def special(token_id: int) -> str:
    return f"<[{token_id}]>"


def schema_of(tool: dict) -> dict:
    """The schema a call's arguments are held to: always an object (a schema
    without a ``type``, ``{}`` included, is one for an object)."""
    params = tool["function"].get("parameters")
    if params is None:
        return NO_PARAMETERS
    return params if "type" in params else {**params, "type": "object"}


def properties(schema: dict) -> list[tuple[str, dict]]:
    """An object schema's properties as (name, schema), for formats that
    write each argument on its own: a boolean schema ``true`` (any value)
    as ``{}``; a property whose schema is ``false`` can't be written."""
    props = schema.get("properties") or {}
    return [(k, {} if sub is True else sub) for k, sub in props.items() if sub is not False]


def json_rule(schema: Any) -> str:
    """``%json`` with the worker's JSON options (tight whitespace, strict)."""
    from ..constraints.llguidance_engine import JSON_OPTIONS, JSON_OVERRIDES

    schema = dict(schema)
    schema["x-guidance"] = {**JSON_OPTIONS, **schema.get("x-guidance", {}), **JSON_OVERRIDES}
    return "%json " + json.dumps(schema)


class Vocab:
    """Marker text -> Lark: a marker that is one added token is matched as
    that token (so the same text spelled in ordinary tokens is not a marker),
    any other text as a literal."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def token(self, text: str) -> Optional[int]:
        ids = self.ids(text)
        return ids[0] if len(ids) == 1 else None

    def m(self, text: str) -> str:
        tid = self.token(text)
        return special(tid) if tid is not None and _is_added(self.tokenizer, text) else lit(text)


def _is_added(tokenizer, text: str) -> bool:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        return text in hf.get_added_vocab()
    except Exception:
        return False


def new_call_id(prefix: str = "call_") -> str:
    return prefix + secrets.token_hex(12)


def alnum_id(n: int = 9) -> str:
    return "".join(secrets.choice(ALNUM) for _ in range(n))


class Format:
    """One call syntax. Subclasses set the markers and write ``rules`` /
    ``parse``; everything else has a default."""

    name = ""
    start: Optional[str] = None  # the call (or call section) start marker
    end: Optional[str] = None  # its end marker; None: a call ends at EOS
    think: Optional[tuple[str, str]] = None  # reasoning markers the family adds
    lead: Optional[str] = None  # no start marker: a call is an output that begins so
    text_lead: Optional[str] = None  # no start marker: text is an output that begins so, a call any other
    after_call = "free"  # after a call: free | call_or_end (only another call or EOS) | end (EOS)
    parallel = True  # several calls in one turn
    args_as_string = False  # the template concatenates `arguments`: pass JSON text
    trigger_doc = ""  # the auto trigger, for the spec's table
    id_doc = "`call_` + 24 hex"
    channel_start: Optional[str] = None  # the channel splitter's call markers, where not start/end
    channel_end: Optional[str] = None
    structural: tuple = ()  # markers that are neither channel text nor calls
    open_text: Optional[str] = None  # a prompt ending so opens the grammar (generation prompt inside a header)
    none_needs_grammar = False  # "none" is a grammar, not a banned marker
    eos_ends_call = False  # EOS completes a call even though the format has an end marker
    parser = ""  # the mlx-lm tool parser reused, if any

    def specialise(self, template: str) -> "Format":
        return self

    def response_format(self) -> Optional[dict]:
        """mlx-lm response_format transitions for families whose channels
        are more than start/end markers."""
        return None

    def detect(self, template: str, vocab: dict) -> bool:
        raise NotImplementedError

    def rules(self, v: Vocab, tools: list[dict], mode: str, parallel: bool = True) -> list[str]:
        """Lark lines; rule ``start`` is one call from its start marker (a
        section or list of calls where the format groups them; one call
        without ``parallel``). ``mode``: auto | call (required) | none
        (formats whose "none" is a grammar)."""
        raise NotImplementedError

    def parse(self, text: str, tools: Optional[list[dict]]) -> list[dict]:
        """The call text (between the markers) -> [{name, arguments, id?}]."""
        raise NotImplementedError

    def new_id(self) -> str:
        return new_call_id()

    def render_call(self, call: dict) -> dict:
        """A worker ToolCall as the family's template reads it."""
        args = call["arguments"]
        if self.args_as_string and not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        out = {"type": "function", "function": {"name": call["name"], "arguments": args}}
        return {"id": call["id"], **out} if call.get("id") is not None else out

    # helpers for subclasses ------------------------------------------------

    @staticmethod
    def alternatives(tools: list[dict], body) -> list[str]:
        """``call: tool_0 | tool_1 ...`` with ``tool_i: body(i, name_literal, args_rule)``."""
        lines = ["call: " + " | ".join(f"tool_{i}" for i in range(len(tools)))]
        for i, t in enumerate(tools):
            lines.append(f"tool_{i}: " + body(i, t["function"]["name"], f"args_{i}"))
            lines.append(f"args_{i}: " + json_rule(schema_of(t)))
        return lines


def as_list(result: Any) -> list[dict]:
    return result if isinstance(result, list) else [result]


def loads_args(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            return arguments
    return arguments


def mlx_parse(module: str, text: str, tools) -> list[dict]:
    """mlx-lm's own parser for the format."""
    import importlib

    result = importlib.import_module(f"mlx_lm.tool_parsers.{module}").parse_tool_call(text, tools)
    return [{**c, "arguments": loads_args(c.get("arguments", {}))} for c in as_list(result)]


def string_value(schema: dict, forbid: str = "<") -> str:
    """Lark for a raw (unquoted) string argument that XML-style formats
    write: an enum's values, else text without ``forbid`` within maxLength."""
    if "const" in schema:
        return lit(str(schema["const"])) or '""'
    if "enum" in schema:
        return "(" + " | ".join(lit(str(e)) or '""' for e in schema["enum"]) + ")"
    hi = schema.get("maxLength")
    lo = schema.get("minLength", 0)
    cls = "[^" + "".join({"\n": "\\n", "]": "\\]", "\\": "\\\\", "^": "\\^", "-": "\\-"}.get(c, c) for c in forbid) + "]"
    return f"/{cls}{{{lo},{hi}}}/" if hi is not None else f"/{cls}{{{lo},}}/"


def is_raw_string(schema: dict) -> bool:
    return schema.get("type") == "string" or isinstance(schema.get("const"), str) or (
        "enum" in schema and all(isinstance(e, str) for e in schema["enum"]))


def xml_params(tools: list[dict], i: int, param, forbid: str = "<") -> list[str]:
    """``params_i``: each property of tool i in schema order (required ones
    always, others optional), ``param(name, value_rule)`` around each."""
    schema = schema_of(tools[i])
    required = set(schema.get("required") or [])
    parts, lines = [], []
    for j, (key, sub) in enumerate(properties(schema)):
        rule = f"v_{i}_{j}"
        lines.append(f"{rule}: " + (string_value(sub, forbid) if is_raw_string(sub) else json_rule(sub)))
        item = param(key, rule)
        parts.append(item if key in required else f"({item})?")
    lines.append(f"params_{i}: " + (" ".join(parts) if parts else '""'))
    return lines

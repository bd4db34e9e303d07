"""Mistral: ``[TOOL_CALLS]``, in the form the model's own template renders.

- tekken templates: ``[TOOL_CALLS]N[ARGS]{...}`` per call, with ``[CALL_ID]id``
  where the template renders it (Small 3.2);
- Nemo: one JSON list, ``[TOOL_CALLS][{"name": N, "arguments": {...}, "id": id}, ...]``.
No end marker: a call ends at the next ``[TOOL_CALLS]`` or at EOS; ids are 9
alphanumerics. Spec: protocol/README.md § Formats (families).
"""

from __future__ import annotations

import json

import regex as re

from .base import Format, alnum_id, lit, loads_args

_HEADER = re.compile(r"\s*([\w.-]+)\s*(?:\[CALL_ID\]\s*([A-Za-z0-9]+)\s*)?\[ARGS\]\s*")
ID = '/[a-zA-Z0-9]{9}/'


class Mistral(Format):
    name = "mistral"
    start = "[TOOL_CALLS]"
    after_call = "call_or_end"
    trigger_doc = "`[TOOL_CALLS]` token"
    id_doc = "9 alphanumerics"

    def __init__(self, form: str = "args"):
        self.form = form  # args | call_id | list

    def detect(self, template, vocab):
        return "[TOOL_CALLS]" in template

    def specialise(self, template: str) -> "Mistral":
        if '"[TOOL_CALLS][' in template or "'[TOOL_CALLS]['" in template:
            return MistralList()
        if "[CALL_ID]" in template:
            return Mistral("call_id")
        return self

    def rules(self, v, tools, mode, parallel=True):
        start = f"start: {v.m(self.start)} call"
        if self.form == "call_id":
            body = lambda i, name, args: f"{lit(name)} {v.m('[CALL_ID]')} {ID} {v.m('[ARGS]')} {args}"  # noqa: E731
        else:
            body = lambda i, name, args: f"{lit(name)} {v.m('[ARGS]')} {args}"  # noqa: E731
        return [start] + self.alternatives(tools, body)

    def parse(self, text, tools):
        calls, pos, decoder = [], 0, json.JSONDecoder()
        while (m := _HEADER.match(text, pos)) is not None:
            args, pos = decoder.raw_decode(text, m.end())
            call = {"name": m.group(1), "arguments": args}
            if m.group(2):
                call["id"] = m.group(2)
            calls.append(call)
        if not calls or text[pos:].strip():
            raise ValueError(f"not a [TOOL_CALLS] call: {text!r}")
        return calls

    def new_id(self):
        return alnum_id(9)


class MistralList(Mistral):
    """Nemo's JSON list: all calls of the turn in one list, then EOS."""

    after_call = "end"
    trigger_doc = "`[TOOL_CALLS]` token (one JSON list of calls)"

    def __init__(self):
        super().__init__("list")

    def rules(self, v, tools, mode, parallel=True):
        lines = [f'start: {v.m(self.start)} "[" call ' + ("(\", \" call)* " if parallel else "") + '"]"']
        head = lambda name: lit('{"name": "' + name + '", "arguments": ')  # noqa: E731
        tail = lit(', "id": "') + f" {ID} " + lit('"}')
        return lines + self.alternatives(tools, lambda i, name, args: f"{head(name)} {args} {tail}")

    def parse(self, text, tools):
        items = json.loads(text)
        if not isinstance(items, list):
            raise ValueError("Nemo calls are a JSON list")
        out = []
        for item in items:
            call = {"name": item.get("name"), "arguments": loads_args(item.get("arguments", {}))}
            if isinstance(item.get("id"), str):
                call["id"] = item["id"]
            out.append(call)
        return out

"""Functionary v3.2: messages ``>>>RECIPIENT\\nTEXT``; ``>>>all`` is the
answer, ``>>>N\\n{...}`` a call. The generation prompt ends with ``>>>``, so the
grammar holds the first recipient (and a call's arguments); a later ``>>>``
in the text opens another call (free). The template concatenates
``arguments``: rendered as JSON text.
Spec: protocol/README.md § Formats (families).
"""

from __future__ import annotations

import json

from .base import Format, lit


class FunctionaryV32(Format):
    name = "functionary_v32"
    channel_start = ">>>"
    open_text = ">>>"
    none_needs_grammar = True
    args_as_string = True
    after_call = "end"
    trigger_doc = "the generation prompt's `>>>`: the first recipient is grammar (`all` = text)"

    def detect(self, template, vocab):
        return ">>>all" in template

    def rules(self, v, tools, mode, parallel=True):
        text = lit("all" + chr(10))
        call = "call" if tools else None
        body = {"none": text, "call": call, "auto": f"{call} | {text}" if call else text}[mode]
        lines = [f"start: {body}"]
        if tools:
            lines += self.alternatives(tools, lambda i, name, args: f"{lit(name + chr(10))} {args}")
        return lines

    text_lead = "all\n"  # the output starts with it: text; with anything else: a call

    def response_format(self):
        return {"initial_state": "header",
                "transitions": {"header": [("all\n", "normal")], "tool": [(">>>", "tool")], "normal": [(">>>", "tool")]}}

    def parse(self, text, tools):
        name, _, args = text.strip().partition("\n")
        return [{"name": name.strip(), "arguments": json.loads(args) if args.strip() else {}}]

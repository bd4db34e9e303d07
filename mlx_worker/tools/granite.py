"""Granite 3.x: ``<|tool_call|>[{"name": N, "arguments": {...}}, ...]`` up to EOS
(the form its system prompt asks for; the template doesn't render calls).
Spec: protocol/README.md § Formats (families).
"""

from __future__ import annotations

import json

from .base import Format, lit, loads_args


class Granite(Format):
    name = "granite"
    start = "<|tool_call|>"
    after_call = "end"
    trigger_doc = "`<|tool_call|>` token (one JSON list of calls)"

    def detect(self, template, vocab):
        return "<|tool_call|>" in template and "<|start_of_role|>" in template

    def rules(self, v, tools, mode, parallel=True):
        head = lambda name: lit('{"name": "' + name + '", "arguments": ')  # noqa: E731
        return [f'start: {v.m(self.start)} "[" call ' + ("(\", \" call)* " if parallel else "") + '"]"'] + self.alternatives(
            tools, lambda i, name, args: f"{head(name)} {args} {lit('}')}")

    def parse(self, text, tools):
        items = json.loads(text)
        items = items if isinstance(items, list) else [items]
        return [{"name": c.get("name"), "arguments": loads_args(c.get("arguments", {}))} for c in items]

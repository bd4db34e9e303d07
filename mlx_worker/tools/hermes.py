"""Hermes / Qwen2.5 / Qwen3 (mlx-lm ``json_tools``):
``<tool_call>\\n{"name": "N", "arguments": {...}}\\n</tool_call>``, one block per call.
Spec: protocol/README.md § Formats (families).
"""

from __future__ import annotations

import json

from .base import Format, as_list, lit, loads_args


class Hermes(Format):
    name = "json_tools"
    start, end = "<tool_call>", "</tool_call>"
    trigger_doc = "`<tool_call>` token"

    def detect(self, template, vocab):
        return "<tool_call>" in template and "tool_call.name" in template

    def rules(self, v, tools, mode, parallel=True):
        head = lambda name: lit('\n{"name": "' + name + '", "arguments": ')  # noqa: E731
        return [f"start: {v.m(self.start)} call {lit(chr(10))} {v.m(self.end)}"] + self.alternatives(
            tools, lambda i, name, args: f"{head(name)} {args} {lit('}')}")

    def parse(self, text, tools):
        out = []
        for item in as_list(json.loads(text.strip())):
            out.append({"name": item.get("name"), "arguments": loads_args(item.get("arguments", {}))})
        return out

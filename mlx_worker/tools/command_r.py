"""Command R7B: ``<|START_ACTION|>[\\n    {"tool_call_id": "0", "tool_name": N, "parameters": {...}}...\\n]<|END_ACTION|>``;
the plan in ``<|START_THINKING|>``…``<|END_THINKING|>`` (reasoning), the answer
between ``<|START_RESPONSE|>`` and ``<|END_RESPONSE|>`` (markers).
Spec: protocol/README.md § Formats (families).
"""

from __future__ import annotations

import json

from .base import Format, lit, loads_args


class CommandR(Format):
    name = "command_r7b"
    start, end = "<|START_ACTION|>", "<|END_ACTION|>"
    think = ("<|START_THINKING|>", "<|END_THINKING|>")
    structural = ("<|START_RESPONSE|>", "<|END_RESPONSE|>")
    after_call = "end"
    trigger_doc = "`<|START_ACTION|>` token (one JSON list of calls)"

    def detect(self, template, vocab):
        return "<|START_ACTION|>" in template

    def rules(self, v, tools, mode, parallel=True):
        head = lambda name: lit('", "tool_name": "' + name + '", "parameters": ')  # noqa: E731
        sep = lit("," + chr(10) + "    ")
        # The template numbers the calls of a turn 0, 1, ...
        more = f"({sep} later)* " if parallel else ""
        return [f"start: {v.m(self.start)} {lit('[' + chr(10) + '    ')} first {more}{lit(chr(10) + ']')} {v.m(self.end)}",
                "first: " + lit('{"tool_call_id": "0') + " tools",
                "later: " + lit('{"tool_call_id": "') + " /[1-9][0-9]?/ tools"] + [
            line.replace("call: ", "tools: ", 1) if line.startswith("call: ") else line
            for line in self.alternatives(tools, lambda i, name, args: f"{head(name)} {args} {lit('}')}")]

    def parse(self, text, tools):
        items = json.loads(text)
        items = items if isinstance(items, list) else [items]
        return [{"name": c.get("tool_name"), "arguments": loads_args(c.get("parameters", {}))} for c in items]

"""Pythonic calls (mlx-lm ``pythonic``; LFM2, Llama 4 style):
``<|tool_call_start|>[f(a=1), g(b="x")]<|tool_call_end|>``. Values are
written as JSON, which Python reads except for booleans and null.
Spec: protocol/README.md § Formats (families).
"""

from __future__ import annotations

from .base import Format, json_rule, lit, mlx_parse, properties, schema_of
from .hermes import Hermes


class Pythonic(Format):
    name = "pythonic"
    parser = "pythonic"
    start, end = "<|tool_call_start|>", "<|tool_call_end|>"
    trigger_doc = "`<|tool_call_start|>` token"

    def detect(self, template, vocab):
        return "<|tool_call_start|>" in template or "<|tool_list_start|>" in template or (
            "<|tool_call_start|>" in vocab and "<|tool_call_end|>" in vocab)

    def specialise(self, template):
        if '<|tool_call_start|>\n{"name": "' in template or "<|tool_call_start|>\\n{\"name\": \"" in template:
            return Lfm2Json()
        return self

    def rules(self, v, tools, mode, parallel=True):
        lines = [f'start: {v.m(self.start)} "[" call ' + ("(\", \" call)* " if parallel else "") + f'"]" {v.m(self.end)}',
                 "call: " + " | ".join(f"tool_{i}" for i in range(len(tools)))]
        for i, t in enumerate(tools):
            schema = schema_of(t)
            req = set(schema.get("required") or [])
            parts = []
            for j, (k, sub) in enumerate(properties(schema)):
                lines.append(f"v_{i}_{j}: {json_rule(sub)}")
                parts.append((k in req, f"{lit(k + '=')} v_{i}_{j}"))
            body = ' ", " '.join(p for _, p in parts if _) or '""'
            lines.append(f"tool_{i}: {lit(t['function']['name'] + '(')} {body} \")\"")
        return lines

    def parse(self, text, tools):
        return mlx_parse(self.parser, text, tools)


class Lfm2Json(Hermes):
    """LFM2 templates that render JSON calls between the pythonic markers:
    ``<|tool_call_start|>\\n{"name": "N", "arguments": A}\\n<|tool_call_end|>``."""

    name = "lfm2_json"
    start, end = "<|tool_call_start|>", "<|tool_call_end|>"
    trigger_doc = "`<|tool_call_start|>` token"

    def detect(self, template, vocab):
        return False  # reached through Pythonic.specialise

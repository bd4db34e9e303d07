"""Gemma tool calls (mlx-lm ``function_gemma`` / ``gemma4``):
``<start_function_call>call:N{k:<escape>v<escape>,...}<end_function_call>`` and
``<|tool_call>call:N{...}<tool_call|>``. Values: strings between
``<escape>`` markers, others as JSON.
Spec: protocol/README.md § Formats (families).
"""

from __future__ import annotations

from .base import Format, is_raw_string, json_rule, lit, mlx_parse, properties, schema_of, string_value


class FunctionGemma(Format):
    name = "function_gemma"
    parser = "function_gemma"
    start, end = "<start_function_call>", "<end_function_call>"
    escape = "<escape>"
    sorted_keys = False  # the template writes arguments in key order (dictsort)
    trigger_doc = "`<start_function_call>` token"

    def detect(self, template, vocab):
        return "<start_function_call>" in template

    def rules(self, v, tools, mode, parallel=True):
        lines = [f"start: {v.m(self.start)} {lit('call:')} call {v.m(self.end)}",
                 "call: " + " | ".join(f"tool_{i}" for i in range(len(tools)))]
        for i, t in enumerate(tools):
            schema = schema_of(t)
            req = set(schema.get("required") or [])
            parts = []
            props = properties(schema)
            for j, (k, sub) in enumerate(sorted(props) if self.sorted_keys else props):
                if k not in req:
                    continue
                value = (f"{v.m(self.escape)} v_{i}_{j} {v.m(self.escape)}" if is_raw_string(sub) else f"v_{i}_{j}")
                lines.append(f"v_{i}_{j}: " + (string_value(sub) if is_raw_string(sub) else json_rule(sub)))
                parts.append(f"{lit(k + ':')} {value}")
            body = ' "," '.join(parts)
            lines.append(f"tool_{i}: {lit(t['function']['name'] + '{')} {body} " + lit("}"))
        return lines

    def parse(self, text, tools):
        return mlx_parse(self.parser, text, tools)


class Gemma4(FunctionGemma):
    name = "gemma4"
    parser = "gemma4"
    start, end = "<|tool_call>", "<tool_call|>"
    escape = '<|"|>'
    sorted_keys = True
    trigger_doc = "`<|tool_call>` token"

    def detect(self, template, vocab):
        return "<|tool_call>" in template and "<tool_call|>" in template

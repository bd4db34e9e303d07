"""Qwen3-Coder XML calls (mlx-lm ``qwen3_coder``):
``<tool_call>\\n<function=N>\\n<parameter=K>\\nV\\n</parameter>\\n</function>\\n</tool_call>``.
String values are raw text (one line when forced: the value's end is a
newline); other values as the template writes them
(``value | string``; the grammar writes JSON, which the parser reads).
Spec: protocol/README.md § Formats (families).
"""

from __future__ import annotations

from .base import Format, lit, mlx_parse, xml_params


class Qwen3Coder(Format):
    name = "qwen3_coder"
    parser = "qwen3_coder"
    start, end = "<tool_call>", "</tool_call>"
    trigger_doc = "`<tool_call>` token"

    def detect(self, template, vocab):
        return "<tool_call>\\n<function=" in template or "<tool_call>\n<function=" in template

    def rules(self, v, tools, mode, parallel=True):
        lines = [f"start: {v.m(self.start)} {lit(chr(10) + '<function=')} call {lit('</function>' + chr(10))} {v.m(self.end)}",
                 "call: " + " | ".join(f"tool_{i}" for i in range(len(tools)))]
        for i, t in enumerate(tools):
            lines.append(f"tool_{i}: {lit(t['function']['name'] + '>' + chr(10))} params_{i}")
            lines += xml_params(tools, i, lambda k, r: f"{lit('<parameter=' + k + '>' + chr(10))} {r} "
                                                      f"{lit(chr(10) + '</parameter>' + chr(10))}", forbid="<\n")
        return lines

    def parse(self, text, tools):
        return mlx_parse(self.parser, text, tools)

"""GLM-4.5 / 4.6 / 4.7 (mlx-lm ``glm47``):
``<tool_call>N\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n...</tool_call>``,
strings raw, other values JSON; reasoning in ``<think>``.
Spec: protocol/README.md § Formats (families).
"""

from __future__ import annotations

from .base import Format, lit, mlx_parse, xml_params


class Glm47(Format):
    name = "glm47"
    parser = "glm47"
    start, end = "<tool_call>", "</tool_call>"
    think = ("<think>", "</think>")
    trigger_doc = "`<tool_call>` token"

    def detect(self, template, vocab):
        return "<arg_key>" in template

    def rules(self, v, tools, mode, parallel=True):
        lines = [f"start: {v.m(self.start)} call {v.m(self.end)}",
                 "call: " + " | ".join(f"tool_{i}" for i in range(len(tools)))]
        for i, t in enumerate(tools):
            lines.append(f"tool_{i}: {lit(t['function']['name'] + chr(10))} params_{i}")
            lines += xml_params(tools, i, lambda k, r: f"{v.m('<arg_key>')} {lit(k)} {v.m('</arg_key>')} "
                                                      f"{lit(chr(10))} {v.m('<arg_value>')} {r} {v.m('</arg_value>')} {lit(chr(10))}")
        return lines

    def parse(self, text, tools):
        return mlx_parse(self.parser, text, tools)

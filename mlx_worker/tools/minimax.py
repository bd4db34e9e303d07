"""MiniMax-M2 (mlx-lm ``minimax_m2``): ``<minimax:tool_call>\\n<invoke name="N">\\n
<parameter name="K">V</parameter>\\n</invoke>\\n</minimax:tool_call>``; reasoning in ``<think>``.
Spec: protocol/README.md § Formats (families).
"""

from __future__ import annotations

from .base import Format, lit, mlx_parse, xml_params


class MinimaxM2(Format):
    name = "minimax_m2"
    parser = "minimax_m2"
    start, end = "<minimax:tool_call>", "</minimax:tool_call>"
    think = ("<think>", "</think>")
    trigger_doc = "`<minimax:tool_call>` token"

    def detect(self, template, vocab):
        return "<minimax:tool_call>" in template

    def rules(self, v, tools, mode, parallel=True):
        lines = [f"start: {v.m(self.start)} {lit(chr(10))} call{'+' if parallel else ''} {v.m(self.end)}",
                 "call: " + " | ".join(f"tool_{i}" for i in range(len(tools)))]
        for i, t in enumerate(tools):
            lines.append(f"tool_{i}: {lit('<invoke name=' + chr(34) + t['function']['name'] + chr(34) + '>' + chr(10))} "
                         f"params_{i} {lit('</invoke>' + chr(10))}")
            lines += xml_params(tools, i, lambda k, r: f"{lit('<parameter name=' + chr(34) + k + chr(34) + '>')} {r} "
                                                      f"{lit('</parameter>' + chr(10))}")
        return lines

    def parse(self, text, tools):
        return mlx_parse(self.parser, text, tools)

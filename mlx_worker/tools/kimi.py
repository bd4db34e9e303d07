"""Kimi-K2 (mlx-lm ``kimi_k2``): one section of calls,
``<|tool_calls_section_begin|><|tool_call_begin|>functions.N:IDX<|tool_call_argument_begin|>{...}<|tool_call_end|>...<|tool_calls_section_end|>``.
The call's id is the template's own ``functions.N:IDX``."""

from __future__ import annotations

import regex as re

from .base import Format, lit, mlx_parse

_ID = re.compile(r"<\|tool_call_begin\|>\s*([^<]+?)\s*<\|tool_call_argument_begin\|>")


class KimiK2(Format):
    name = "kimi_k2"
    parser = "kimi_k2"
    start, end = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
    think = ("<think>", "</think>")
    trigger_doc = "`<|tool_calls_section_begin|>` token (a section holds several calls)"
    id_doc = "`functions.NAME:INDEX` (the template's own)"

    def detect(self, template, vocab):
        return "<|tool_calls_section_begin|>" in template

    def rules(self, v, tools, mode):
        return [f"start: {v.m(self.start)} call+ {v.m(self.end)}"] + self.alternatives(
            tools, lambda i, name, args: f"{v.m('<|tool_call_begin|>')} {lit('functions.' + name + ':')} /[0-9]+/ "
                                          f"{v.m('<|tool_call_argument_begin|>')} {args} {v.m('<|tool_call_end|>')}")

    def parse(self, text, tools):
        calls = mlx_parse(self.parser, text, tools)
        for call, ident in zip(calls, _ID.findall(text)):
            call["id"] = ident
        return calls

"""Kimi-K2: one section of calls,
``<|tool_calls_section_begin|><|tool_call_begin|>functions.N:IDX<|tool_call_argument_begin|>{...}<|tool_call_end|>...<|tool_calls_section_end|>``.
Each call is its own channel call (``tool_call_index``); its id is the
template's own ``functions.N:IDX``. (mlx-lm's ``kimi_k2`` parser reads a
whole section; the channel gives one call at a time, parsed here.)
Spec: protocol/README.md § Formats (families).
"""

from __future__ import annotations

import json

import regex as re

from .base import Format, json_rule, lit, schema_of

_CALL = re.compile(r"\s*(functions\.)?([\w.-]+):(\d+)\s*<\|tool_call_argument_begin\|>(.*)$", re.DOTALL)


class KimiK2(Format):
    name = "kimi_k2"
    start, end = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
    channel_start, channel_end = "<|tool_call_begin|>", "<|tool_call_end|>"
    structural = (start, end)
    think = ("<think>", "</think>")
    trigger_doc = "`<|tool_calls_section_begin|>` token (a section holds several calls)"
    id_doc = "`functions.NAME:INDEX` (the template's own)"

    def detect(self, template, vocab):
        return "<|tool_calls_section_begin|>" in template

    def rules(self, v, tools, mode, parallel=True):
        # The template numbers the calls of a turn 0, 1, ... (the id's index).
        lines = [f"start: {v.m(self.start)} first" + (" later*" if parallel else "") + f" {v.m(self.end)}",
                 "first: " + " | ".join(f"first_{i}" for i in range(len(tools))),
                 "later: " + " | ".join(f"later_{i}" for i in range(len(tools)))]
        for i, t in enumerate(tools):
            head = f"{v.m('<|tool_call_begin|>')} {lit('functions.' + t['function']['name'] + ':')}"
            tail = f"{v.m('<|tool_call_argument_begin|>')} args_{i} {v.m('<|tool_call_end|>')}"
            lines.append(f'first_{i}: {head} "0" {tail}')
            lines.append(f"later_{i}: {head} /[1-9][0-9]?/ {tail}")
            lines.append(f"args_{i}: " + json_rule(schema_of(t)))
        return lines

    def parse(self, text, tools):
        m = _CALL.match(text.removeprefix(self.channel_start).removesuffix(self.channel_end))
        if m is None:
            raise ValueError(f"not a Kimi-K2 call: {text!r}")
        name, index, args = m.group(2), m.group(3), m.group(4).strip()
        return [{"name": name, "arguments": json.loads(args), "id": f"functions.{name}:{index}"}]

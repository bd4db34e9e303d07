"""DeepSeek-V3.1: ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>N<｜tool▁sep｜>{...}<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>``
(no mlx-lm parser); reasoning in ``<think>``; the template concatenates
``arguments``, so they are rendered as JSON text.
Spec: protocol/README.md § Formats (families).
"""

from __future__ import annotations

import json

import regex as re

from .base import Format

_CALL = re.compile(r"(?:<｜tool▁call▁begin｜>)?(.*?)<｜tool▁sep｜>(.*?)(?:<｜tool▁call▁end｜>|$)", re.DOTALL)


class DeepSeekV31(Format):
    name = "deepseek_v31"
    start, end = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    channel_start, channel_end = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"  # each call its tool_call_index
    structural = (start, end)
    think = ("<think>", "</think>")
    args_as_string = True
    after_call = "end"
    trigger_doc = "`<｜tool▁calls▁begin｜>` token (a section holds several calls)"

    def detect(self, template, vocab):
        return "<｜tool▁calls▁begin｜>" in template and "<｜tool▁sep｜>" in template

    def rules(self, v, tools, mode, parallel=True):
        return [f"start: {v.m(self.start)} call" + ("+" if parallel else "") + f" {v.m(self.end)}"] + self.alternatives(
            tools, lambda i, name, args: f"{v.m('<｜tool▁call▁begin｜>')} {json.dumps(name)} "
                                          f"{v.m('<｜tool▁sep｜>')} {args} {v.m('<｜tool▁call▁end｜>')}")

    def parse(self, text, tools):
        calls = [{"name": n.strip(), "arguments": json.loads(a)} for n, a in _CALL.findall(text)]
        if not calls:
            raise ValueError(f"no DeepSeek call in {text!r}")
        return calls

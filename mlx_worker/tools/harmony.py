"""gpt-oss harmony. A turn is messages ``<|start|>assistant`` + header +
``<|message|>`` + text: ``<|channel|>analysis`` (reasoning) and
``<|channel|>final`` (content) end at ``<|end|>`` / ``<|return|>``; a call is
``<|start|>assistant to=functions.N<|channel|>commentary json<|message|>{...}<|call|>``.
The generation prompt ends with ``<|start|>assistant``, so the grammar holds
every message's header (channel; for a call the tool and its arguments);
message text is free. Spec: protocol/README.md § Formats (families).
"""

from __future__ import annotations

import json

import regex as re

from .base import Format, lit

_CALL = re.compile(r"functions\.([\w.-]+)\s*(?:<\|channel\|>[^<]*)?(?:<\|constrain\|>[^<]*)?<\|message\|>(.*)$", re.DOTALL)
CHANNELS = ("analysis", "final", "commentary")


class Harmony(Format):
    name = "harmony"
    start = "<|start|>"
    channel_start, channel_end = " to=", "<|call|>"
    open_text = "<|start|>assistant"
    none_needs_grammar = True
    eos_ends_call = True  # <|call|> is an EOS token
    parallel = False
    trigger_doc = "`<|start|>` token and the generation prompt: each message header is grammar; a call is `to=functions.NAME`"

    def detect(self, template, vocab):
        return "<|channel|>" in template and "<|start|>" in template and "<|call|>" in template

    def rules(self, v, tools, mode, parallel=True):
        msg = f"{v.m('<|channel|>')} (" + " | ".join(lit(c) for c in CHANNELS) + f") {v.m('<|message|>')}"
        # The recipient in the role (as the template renders a call) or after
        # the channel (as OpenAI's harmony guide shows it).
        call = (f"{lit(' to=functions.')} call | {v.m('<|channel|>')} {lit('commentary to=functions.')} call_after_channel"
                if tools else None)
        header = {"none": msg, "call": call, "auto": f"{call} | {msg}" if call else msg}[mode]
        lines = [f"start: ({v.m(self.start)} {lit('assistant')})? header", f"header: {header}"]
        if tools:
            lines += self.alternatives(
                tools, lambda i, name, args: f"{lit(name)} {v.m('<|channel|>')} {lit('commentary json')} "
                                              f"{v.m('<|message|>')} {args} {v.m('<|call|>')}")
            lines.append("call_after_channel: " + " | ".join(f"after_{i}" for i in range(len(tools))))
            lines += [f"after_{i}: {lit(t['function']['name'])} ({lit(' ')} {v.m('<|constrain|>')} {lit('json')})? "
                      f"{v.m('<|message|>')} args_{i} {v.m('<|call|>')}" for i, t in enumerate(tools)]
        return lines

    def response_format(self):
        return {
            "initial_state": "header",
            "transitions": {
                # The grammar lets a header open with the role again (its start
                # rule serves every message): a marker, never content.
                "header": [(" to=", "tool"), ("<|channel|>commentary to=", "tool"), ("<|start|>assistant", "header")]
                          + [(f"<|channel|>{c}<|message|>", "reasoning" if c == "analysis" else "normal")
                             for c in CHANNELS],
                "reasoning": [("<|end|>", "between")],
                "normal": [("<|end|>", "between"), ("<|return|>", "between")],
                "between": [("<|start|>assistant", "header")],
                "tool": [("<|call|>", "between")],
            },
        }

    def parse(self, text, tools):
        m = _CALL.search(text.strip())
        if m is None:
            raise ValueError(f"not a harmony call: {text!r}")
        return [{"name": m.group(1), "arguments": json.loads(m.group(2).removesuffix("<|call|>"))}]

"""Llama 3.1 / 3.2 / 3.3 JSON calls: the whole answer is
``{"name": N, "parameters": {...}}`` (no start marker: a call is an output
that begins with ``{"name": "``), ended by ``<|eot_id|>``; the built-in
tools of 3.1 as ``<|python_tag|>N.call(k="v")`` ended by ``<|eom_id|>``.
Spec: protocol/README.md § Formats (families).
"""

from __future__ import annotations

import ast
import json

from .base import Format, lit

LEAD = '{"name": "'


class Llama3(Format):
    name = "llama3_json"
    lead = LEAD
    channel_start = "<|python_tag|>"
    after_call = "end"
    parallel = False
    trigger_doc = 'none (no marker): the output\'s first token begins `{"name": "`; `<|python_tag|>` for built-ins'

    def detect(self, template, vocab):
        return '"parameters": ' in template and "<|start_header_id|>" in template and "ipython" in template

    def rules(self, v, tools, mode, parallel=True):
        return ["start: call"] + self.alternatives(
            tools, lambda i, name, args: f"{lit(LEAD + name + chr(34) + ', ' + chr(34) + 'parameters' + chr(34) + ': ')} {args} {lit('}')}")

    def parse(self, text, tools):
        text = text.strip()
        if text.startswith("{"):
            item = json.loads(text)
            return [{"name": item["name"], "arguments": item.get("parameters", item.get("arguments", {}))}]
        node = ast.parse(text, mode="eval").body  # a built-in: brave_search.call(query="...")
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "call"):
            raise ValueError(f"not a Llama built-in call: {text!r}")
        return [{"name": ast.unparse(node.func.value),
                 "arguments": {k.arg: ast.literal_eval(k.value) for k in node.keywords}}]

"""Tool calls, one module per call format (``formats.FORMATS``): detection,
the grammar that forces the family's own syntax, the parser, reasoning
markers and ids. ``grammar`` turns ``tool_choice`` into a logits processor,
``calls`` turns an output's call texts into ``ToolCall``s.
Spec: protocol/README.md § Tools and reasoning: channels, tool calls, `tool_choice`.
"""

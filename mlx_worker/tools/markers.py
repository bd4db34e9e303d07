"""Channel markers of a model family, as mlx-lm's TokenizerWrapper detects
them, extended where mlx-lm 0.32 misses a family: Mistral's ``[THINK]`` /
``[/THINK]`` control tokens, and the tool parser of a vision model (mlx-vlm's
processor isn't wrapped by mlx-lm's loader; picked here by the same rules).
Spec: protocol/README.md § Channels, § Formats (families).
"""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger("mlx_worker.tools.markers")

EXTRA_THINK_MARKERS = [("[THINK]", "[/THINK]")]


def extend_thinking(wrapper) -> None:
    if wrapper.has_thinking:
        return
    vocab = wrapper._tokenizer.get_vocab()
    for start, end in EXTRA_THINK_MARKERS:
        if start in vocab and end in vocab:
            wrapper._think_start, wrapper._think_end = start, end
            wrapper._think_start_tokens, wrapper._think_end_tokens = (vocab[start],), (vocab[end],)
            return


def tool_parser_options(hf_tokenizer) -> dict:
    """TokenizerWrapper keyword arguments for the family's tool calls, chosen
    as ``mlx_lm.tokenizer_utils.load`` chooses them; {} when none applies."""
    from mlx_lm import tokenizer_utils

    name = getattr(hf_tokenizer, "init_kwargs", {}).get("tool_parser_type")
    try:
        name = name or tokenizer_utils._infer_tool_parser(hf_tokenizer)
        if name is None:
            return {}
        module = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
    except Exception:  # a tokenizer without a template or vocab API: no tool calls
        log.debug("no tool parser", exc_info=True)
        return {}
    return {"tool_parser": module.parse_tool_call, "tool_call_start": module.tool_call_start,
            "tool_call_end": module.tool_call_end}

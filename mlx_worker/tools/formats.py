"""The tool-call formats, and which one a model's tokenizer speaks.

Detection looks at the chat template (for a named template list, its
``tool_use`` entry) and the vocabulary, most specific format first, as
mlx-lm's ``_infer_tool_parser`` does; the chosen format is set on mlx-lm's
``TokenizerWrapper``, so channels and parsing read one place.
Spec: protocol/README.md § Formats (families).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

from .base import Format
from .command_r import CommandR
from .deepseek import DeepSeekV31
from .functionary import FunctionaryV32
from .gemma import FunctionGemma, Gemma4
from .glm import Glm47
from .granite import Granite
from .harmony import Harmony
from .hermes import Hermes
from .kimi import KimiK2
from .llama3 import Llama3
from .minimax import MinimaxM2
from .mistral import Mistral
from .pythonic import Pythonic
from .qwen3_coder import Qwen3Coder

log = logging.getLogger("mlx_worker.tools")

# Most specific first: several templates mention another family's markers.
FORMATS: list[Format] = [
    Harmony(), MinimaxM2(), Gemma4(), FunctionGemma(), Glm47(), Qwen3Coder(), KimiK2(), DeepSeekV31(),
    Mistral(), CommandR(), Granite(), FunctionaryV32(), Pythonic(), Hermes(), Llama3(),
]


def template_text(hf_tokenizer, with_tools: bool = True) -> str:
    """The template that renders a request with tools (a named list's
    ``tool_use`` entry when there is one, as transformers picks it)."""
    t = getattr(hf_tokenizer, "chat_template", None)
    if isinstance(t, dict):
        return t.get("tool_use" if with_tools else "default") or t.get("default") or next(iter(t.values()), "")
    if isinstance(t, list):
        named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
        return named.get("tool_use") or named.get("default") or ""
    return t or ""


def template_names(hf_tokenizer) -> Optional[list[str]]:
    t = getattr(hf_tokenizer, "chat_template", None)
    if isinstance(t, dict):
        return list(t)
    if isinstance(t, list):
        return [e.get("name") for e in t if isinstance(e, dict)]
    return None


def detect(hf_tokenizer) -> Optional[Format]:
    template = template_text(hf_tokenizer)
    try:
        vocab = hf_tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary API
        vocab = {}
    for fmt in FORMATS:
        if fmt.detect(template, vocab):
            return fmt.specialise(template) if hasattr(fmt, "specialise") else fmt
    return None


def install(wrapper) -> Optional[Format]:
    """Set the detected format on an mlx-lm TokenizerWrapper (replacing
    mlx-lm's own pick, which knows fewer formats)."""
    hf = getattr(wrapper, "_tokenizer", wrapper)
    fmt = detect(hf)
    wrapper.tool_format = fmt
    if fmt is None:
        return None
    encode = lambda s: tuple(hf.encode(s, add_special_tokens=False)) if s else None  # noqa: E731
    start, end = fmt.channel_start or fmt.start, fmt.channel_end or fmt.end
    wrapper._tool_call_start = start
    wrapper._tool_call_end = end or ""
    wrapper._tool_call_start_tokens = encode(start)
    wrapper._tool_call_end_tokens = encode(end)
    wrapper._tool_parser = fmt.parse
    if fmt.structural:
        wrapper._structural_markers = tuple(fmt.structural)
    if fmt.think and not wrapper.has_thinking:
        vocab = hf.get_vocab()
        start, end = fmt.think
        if start in vocab and end in vocab:
            wrapper._think_start, wrapper._think_end = start, end
            wrapper._think_start_tokens, wrapper._think_end_tokens = (vocab[start],), (vocab[end],)
    response = fmt.response_format()
    if response is not None:
        wrapper._response_format = response
    return fmt


def format_of(tokenizer) -> Optional[Format]:
    return getattr(tokenizer, "tool_format", None)


def load_fields(tokenizer) -> dict:
    """``load``'s result fields for the family's tool-call format and reasoning
    markers, as ``install`` and mlx-lm's TokenizerWrapper detected them."""
    out: dict = {}
    fmt = format_of(tokenizer)
    if fmt is not None:
        out["tool_call_format"] = fmt.name
        out["tool_grammar"] = True
    names = template_names(getattr(tokenizer, "_tokenizer", tokenizer))
    if names:
        out["chat_template_names"] = names
    if getattr(tokenizer, "has_thinking", False):
        out["reasoning_markers"] = [tokenizer.think_start, tokenizer.think_end]
    return out


@functools.lru_cache(maxsize=8)
def _lead_tokens(key, tokenizer, lead: str) -> list[int]:
    out = []
    for tid in range(len(tokenizer)):
        text = tokenizer.decode([tid])
        if text and (lead.startswith(text) or text.startswith(lead)):
            out.append(tid)
    return out


def lead_tokens(lm, fmt: Format) -> list[int]:
    """Tokens that would start a call of a format without a start marker."""
    hf = lm.hf_tokenizer
    return _lead_tokens(id(hf), hf, fmt.lead)

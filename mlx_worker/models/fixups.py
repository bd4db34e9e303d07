"""What every generating loader does to the tokenizer it loaded: the load's
chat template in place of the folder's, the family's tool-call format and
thinking markers (tools/formats.py, tools/markers.py)."""

from __future__ import annotations

from typing import Optional

from ..tools.formats import install
from ..tools.markers import extend_thinking


def finish_tokenizer(tokenizer, chat_template: Optional[str], processor=None) -> None:
    """``tokenizer`` is mlx-lm's TokenizerWrapper; a vision ``processor``
    renders with its own copy of the template."""
    if chat_template is not None:
        tokenizer._tokenizer.chat_template = chat_template
        if processor is not None and hasattr(processor, "chat_template"):
            processor.chat_template = chat_template
    install(tokenizer)
    extend_thinking(tokenizer)

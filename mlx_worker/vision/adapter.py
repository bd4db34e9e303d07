"""The vision adapter: request params -> a PreparedPrompt for the one loop.

Every prompt on a vision model comes through here, text ones included, because
the prepared prompt's ``embeddings(start)`` is also where the language model
is told the prompt's positions (see lm.py) right before ``generate_step``
runs. ``embeddings(start)`` returns the input embeddings of ``tokens[start:]``
(image features in place of image tokens), or None when no image is left in
that part and plain tokens will do.
"""

from __future__ import annotations

from typing import Any

from ..prompt import PreparedPrompt, one_source, prepare_text
from . import tower_pieces
from .encoders import EncodedPrompt
from .images import ImageLimits
from .lm import PromptPlan, VisionLanguageModel
from .messages import read_images, render, template_messages


class VisionAdapter:
    def __init__(
        self,
        model: VisionLanguageModel,
        processor: Any,
        encoder: Any,
        model_type: str,
        limits: ImageLimits,
        max_images: int,
        max_images_why: str,
    ):
        self.model = model
        self.processor = processor
        self.encoder = encoder
        self.model_type = model_type
        self.limits = limits
        self.max_images = max_images
        self.max_images_why = max_images_why

    def prepare(self, lm, params) -> PreparedPrompt:
        if getattr(params, "messages", None) is None:
            text = prepare_text(lm, params)
            return PreparedPrompt(tokens=text.tokens, rendered=text.rendered, embeddings=self._text_start)
        if hasattr(params, "prompt"):
            one_source(params, ("prompt", "tokens", "messages"))
        images = read_images(params.messages, self.limits, self.max_images, self.max_images_why)
        messages = template_messages(params.messages, self.model_type)
        rendered = render(self.processor, messages, params, lm.model_id)
        encoded: EncodedPrompt = self.encoder.encode(rendered, images)

        def embeddings(start: int):
            """(input embeddings of tokens[start:], the positions the runner sets before each call):
            lazy, the image tower's pieces recorded in the plan (tower_pieces.py)"""
            with tower_pieces.recording() as pieces:
                values, positions, extra = encoded.embeddings(start)
            return values, PromptPlan(positions, extra, len(encoded.tokens), pieces)

        return PreparedPrompt(tokens=encoded.tokens, cache_key=encoded.cache_key, embeddings=embeddings, rendered=rendered)

    def _text_start(self, start: int):
        return None, None

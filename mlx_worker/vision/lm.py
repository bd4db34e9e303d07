"""The language half of a vision-language model, shaped like an mlx-lm model.

mlx-lm's ``generate_step`` calls ``model(tokens, cache=, input_embeddings=)``
and reads logits; mlx-vlm's language models take ``inputs_embeds`` and
position ids and return an output object. This wrapper bridges the two so the
worker's one generation loop drives vision models too.

Positions. Qwen-style models use M-RoPE: an image's tokens get 2-D grid
positions, so a token's position is not its index. The positions of a prompt
are computed once from the whole prompt (``Positions``); a token at cache index
j < len(prompt) gets column j of them, a later (generated) token gets
j + delta. Passing explicit positions on every call keeps mlx-vlm's own
per-generation state (``_position_ids``/``_rope_deltas``) out of the picture,
and makes chunked prefill, a cache that already holds a prefix, and decoding
all agree with a single cold pass. Models that plan image positions inside
their language model (GLM-4V's ``_position_ids``) have that plan taken over
by the encoder (encoders.py), so it is what gets passed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn


@dataclass
class Positions:
    """M-RoPE positions of one prompt: (3, 1, length) ids and the decode delta."""

    ids: mx.array
    delta: int

    @property
    def length(self) -> int:
        return int(self.ids.shape[-1])


class VisionLanguageModel(nn.Module):
    def __init__(self, vlm: nn.Module, mrope: bool):
        super().__init__()
        self.vlm = vlm
        self.mrope = mrope
        # Set by ``begin`` for each generation, before the first model call.
        self._positions: Optional[Positions] = None

    @property
    def layers(self):
        return self.vlm.language_model.layers

    def begin(self, positions: Optional[Positions]) -> None:
        """Use these prompt positions from now on (None: positions = indices)."""
        self._positions = positions

    def __call__(self, inputs: mx.array, cache: Any = None, input_embeddings: Optional[mx.array] = None) -> mx.array:
        kwargs = {}
        if self.mrope:
            offset = _offset(cache)
            kwargs["position_ids"] = self.position_ids(offset, inputs.shape[1])
        out = self.vlm.language_model(inputs, inputs_embeds=input_embeddings, cache=cache, **kwargs)
        return out.logits

    def position_ids(self, offset: int, n: int) -> mx.array:
        plan = self._positions
        if plan is None:
            return mx.broadcast_to(mx.arange(offset, offset + n, dtype=mx.int32), (3, 1, n))
        parts = []
        end = offset + n
        if offset < plan.length:
            parts.append(plan.ids[:, :, offset : min(end, plan.length)].astype(mx.int32))
        if end > plan.length:
            start = max(offset, plan.length)
            tail = mx.arange(start, end, dtype=mx.int32) + plan.delta
            parts.append(mx.broadcast_to(tail, (3, 1, end - start)))
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


class _WithModelCache(VisionLanguageModel):
    """For language models that build their own cache (sliding windows...)."""

    def make_cache(self):
        return self.vlm.language_model.make_cache()


def wrap_language_model(vlm: nn.Module, mrope: bool) -> VisionLanguageModel:
    cls = _WithModelCache if hasattr(vlm.language_model, "make_cache") else VisionLanguageModel
    return cls(vlm, mrope)


def _offset(cache: Any) -> int:
    if not cache:
        return 0
    offset = cache[0].offset
    return int(offset.item()) if isinstance(offset, mx.array) else int(offset)

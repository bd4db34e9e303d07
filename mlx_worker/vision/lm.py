"""The language half of a vision-language model, shaped like an mlx-lm model
(``model(tokens, cache=, input_embeddings=)`` -> logits), so the one generation
loop drives vision models too. Explicit M-RoPE positions on every call (per row
in a decode batch: ``begin_batch``), the extra prefill inputs passed while inside
the prompt, and mlx-lm cache classes in place of mlx-vlm's:
bench/results/design-notes.md ("models", vision/lm.py).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn


# Families whose language model decodes correctly in mlx-lm's BatchKVCache
# (left padding, per-row offsets; checked against each row alone:
# tests/test_vision_batch.py). Others decode alone beside the batch.
BATCH_FAMILIES = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v", "idefics3", "smolvlm", "llava", "mistral3"}


@dataclass
class Positions:
    """M-RoPE positions of one prompt: (3, 1, length) ids and the decode delta."""

    ids: mx.array
    delta: int

    @property
    def length(self) -> int:
        return int(self.ids.shape[-1])


@dataclass
class PromptPlan:
    """What a request tells the language model before each of its calls: the
    prompt's positions (None: positions = indices) and whole-prompt inputs
    for the calls inside its first ``length`` tokens."""

    positions: Optional[Positions] = None
    extra: dict = field(default_factory=dict)
    length: int = 0
    tower: Any = None  # the image tower's work still to run first (tower_pieces.Pieces)


class VisionLanguageModel(nn.Module):
    def __init__(self, vlm: nn.Module, mrope: bool, batch_decode: bool = False):
        super().__init__()
        self.vlm = vlm
        self.mrope = mrope
        # Whether rows of this model decode in one batch (engine/batch.py).
        self.batch_decode = batch_decode
        # Set by ``begin`` for each generation, before the first model call.
        self._plan = PromptPlan()
        # Set by ``begin_batch`` before a batch's decode call: each row's delta.
        self._deltas: Optional[mx.array] = None

    @property
    def layers(self):
        return self.vlm.language_model.layers

    @property
    def plan(self) -> PromptPlan:
        return self._plan

    def begin(self, plan: Optional[PromptPlan]) -> None:
        """Use this request's plan from now on (None: a plain text prompt)."""
        self._plan = plan or PromptPlan()
        self._deltas = None

    def begin_batch(self, plans: list[Optional[PromptPlan]]) -> None:
        """The next call (only) is a batch's decode step: row i (past its
        prompt, in a BatchKVCache) at its own offset + plans[i]'s rope delta."""
        deltas = []
        for plan in plans:
            if plan is not None:
                plan.extra = {}  # past the prompt for good: let go of them
            deltas.append(plan.positions.delta if plan is not None and plan.positions is not None else 0)
        self._deltas = mx.array(deltas, dtype=mx.int32)

    def __call__(self, inputs: mx.array, cache: Any = None, input_embeddings: Optional[mx.array] = None) -> mx.array:
        _recurrent_layers(cache)
        if self._deltas is not None:  # for this one call
            deltas, self._deltas = self._deltas, None
            return self._batch_call(inputs, cache, input_embeddings, deltas)
        kwargs = {}
        plan = self._plan
        offset = _offset(cache) if (self.mrope or plan.extra) else 0
        if self.mrope:
            kwargs["position_ids"] = self.position_ids(offset, inputs.shape[1])
        if plan.extra and offset < plan.length:
            kwargs.update(plan.extra)
        elif plan.extra:  # past the prompt for good: let go of them (per-layer inputs are large)
            plan.extra = {}
        out = self.vlm.language_model(inputs, inputs_embeds=input_embeddings, cache=cache, **kwargs)
        return out.logits

    def _batch_call(self, inputs: mx.array, cache: Any, input_embeddings: Optional[mx.array],
                    deltas: mx.array) -> mx.array:
        kwargs = {}
        if self.mrope:  # (3, B, n): each row's offset (lazy, from the cache) + its delta
            offsets = cache[0].offset.astype(mx.int32) + deltas
            ids = offsets[:, None] + mx.arange(inputs.shape[1], dtype=mx.int32)[None]
            kwargs["position_ids"] = mx.broadcast_to(ids[None], (3, *ids.shape))
        out = self.vlm.language_model(inputs, inputs_embeds=input_embeddings, cache=cache, **kwargs)
        return out.logits

    def position_ids(self, offset: int, n: int) -> mx.array:
        positions = self._plan.positions
        if positions is None:
            return mx.broadcast_to(mx.arange(offset, offset + n, dtype=mx.int32), (3, 1, n))
        parts = []
        end = offset + n
        if offset < positions.length:
            parts.append(positions.ids[:, :, offset : min(end, positions.length)].astype(mx.int32))
        if end > positions.length:
            start = max(offset, positions.length)
            tail = mx.arange(start, end, dtype=mx.int32) + positions.delta
            parts.append(mx.broadcast_to(tail, (3, 1, end - start)))
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


class _WithModelCache(VisionLanguageModel):
    """For language models that build their own cache (sliding windows...)."""

    def make_cache(self):
        return [_worker_layer(c) for c in self.vlm.language_model.make_cache()]


def wrap_language_model(vlm: nn.Module, mrope: bool) -> VisionLanguageModel:
    cls = _WithModelCache if hasattr(vlm.language_model, "make_cache") else VisionLanguageModel
    return cls(vlm, mrope, batch_decode=_batch_decode(vlm))


def _batch_decode(vlm: nn.Module) -> bool:
    """Whether this family's rows decode in one batch. MLX_WORKER_VISION_BATCH=0
    turns it off (each vision request then decodes in a group of its own, as
    before: bench/vision.py compares the two)."""
    if os.environ.get("MLX_WORKER_VISION_BATCH", "1") == "0":
        return False
    return str(getattr(vlm.config, "model_type", "")) in BATCH_FAMILIES


@functools.cache
def _recurrent_class():
    # Late: importing mlx-vlm costs about a second at start-up.
    from mlx_vlm.models.cache import ArraysCache as VlmArraysCache

    class ArraysCache(VlmArraysCache):
        """mlx-vlm's recurrent cache whose state is laid out as mlx-lm's."""

        @property
        def state(self):
            return self.cache, self.left_padding, self.lengths

        @state.setter
        def state(self, v):
            self.cache, self.left_padding, self.lengths = v

    return ArraysCache


def _recurrent(size: int) -> Any:
    return _recurrent_class()(size)


def _recurrent_layers(cache: Any) -> None:
    """mlx-lm's ArraysCache (read from a cache file) -> the recurrent class, in place."""
    for i, c in enumerate(cache or ()):
        if type(c).__name__ == "ArraysCache" and type(c).__module__.startswith("mlx_lm."):
            layer = _recurrent(len(c.cache))
            layer.state = c.state
            cache[i] = layer


def _worker_layer(c: Any) -> Any:
    """The cache class the worker's store, cache files and KV quantization
    recognise, for one of mlx-vlm's (the same behaviour)."""
    from mlx_lm.models import cache as lm_cache

    if type(c).__module__.startswith("mlx_lm."):
        return c
    kind = type(c).__name__
    if kind == "KVCache":
        return lm_cache.KVCache()
    if kind == "RotatingKVCache":
        return lm_cache.RotatingKVCache(max_size=c.max_size, keep=c.keep)
    if kind == "ArraysCache":
        return _recurrent(len(c.cache))
    return c


def _offset(cache: Any) -> int:
    """Tokens in the cache, from the first layer that counts them (a DeltaNet
    or SSM layer keeps state, not an offset)."""
    for c in cache or ():
        offset = getattr(c, "offset", None)
        if offset is not None:
            return int(offset.item()) if isinstance(offset, mx.array) else int(offset)
    return 0

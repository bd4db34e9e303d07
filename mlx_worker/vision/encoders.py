"""Rendered prompt + images -> prompt tokens, a cache key and input embeddings.

``QwenEncoder`` runs the vision tower once per image, kept by content hash;
``GenericEncoder`` serves other mlx-vlm architectures over the whole prompt.
Image positions in the cache key are ``"img:<sha256>:<k>"`` (protocol/README.md,
"Vision"; bench/results/design-notes.md, "models").
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx

from .. import errors
from ..errors import WorkerError
from . import tower_pieces
from .features import FeatureCache, Features
from .images import ImageInput, ImageLimits, decode_image, image_error
from .lm import Positions


@dataclass
class EncodedPrompt:
    tokens: list[int]
    cache_key: list
    encoder: Any
    images: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    _positions: Optional[Positions] = None

    def embeddings(self, start: int) -> tuple[Optional[mx.array], Optional[Positions], dict]:
        """Input embeddings of tokens[start:] (None: plain tokens will do), the
        prompt's positions, and whole-prompt inputs for the prefill calls."""
        return self.encoder.embeddings(self, start)


def _placeholder_error(found: int, images: int) -> WorkerError:
    return image_error(
        "params.messages", "placeholder_mismatch",
        f"the rendered prompt has {found} image placeholders for {images} images "
        "(does a text part contain the model's image token?)",
    )


# ------------------------------------------------------------------- Qwen


@dataclass
class _QwenImage:
    input: ImageInput
    grid: tuple[int, int, int]
    n_tokens: int
    start: int = 0
    pixels: Optional[Any] = None  # preprocessed patches, until the tower has run


class QwenEncoder:
    MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

    def __init__(self, vlm, processor, cache: FeatureCache, limits: ImageLimits):
        self.vlm = vlm
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.cache = cache
        self.limits = limits
        self.image_token_id = int(vlm.config.image_token_id)
        self.merge = int(vlm.config.vision_config.spatial_merge_size)

    def encode(self, rendered: str, images: list[ImageInput]) -> EncodedPrompt:
        ids = list(self.tokenizer.encode(rendered, add_special_tokens=False))
        slots = [k for k, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != len(images):
            raise _placeholder_error(len(slots), len(images))
        prompt_images = [self._inspect(image) for image in images]
        tokens: list[int] = []
        key: list = []
        prev = 0
        # Expand each placeholder to the image's token count, as the processor does.
        for slot, image in zip(slots, prompt_images):
            tokens.extend(ids[prev:slot])
            key.extend(ids[prev:slot])
            image.start = len(tokens)
            tokens.extend([self.image_token_id] * image.n_tokens)
            key.extend(f"img:{image.input.sha256}:{k}" for k in range(image.n_tokens))
            prev = slot + 1
        tokens.extend(ids[prev:])
        key.extend(ids[prev:])
        return EncodedPrompt(tokens=tokens, cache_key=key, encoder=self, images=prompt_images)

    def _inspect(self, image: ImageInput) -> _QwenImage:
        cached = self.cache.get(image.sha256)
        if cached is not None:  # the same bytes were decoded and checked before
            grid = cached.grid
            pixels = None
        else:
            pixels, grid = self._preprocess(image)
        n_tokens = math.prod(grid) // (self.merge * self.merge)
        return _QwenImage(input=image, grid=grid, n_tokens=n_tokens, pixels=pixels)

    def _preprocess(self, image: ImageInput):
        picture = decode_image(image, self.limits)
        try:
            out = self.processor.image_processor(images=[picture])
        except Exception as exc:
            raise image_error(image.field, "unprocessable", f"the image processor failed: {exc}") from None
        grid = tuple(int(v) for v in out["image_grid_thw"][0])
        return out["pixel_values"], grid

    def _features(self, image: _QwenImage) -> mx.array:
        """The image's features, lazy: the request computes them piece by
        piece (tower_pieces.py); a request with the same image meanwhile
        shares those pieces, and a failed piece drops the entry."""
        sha = image.input.sha256
        cached = self.cache.get(sha)
        if cached is not None:
            tower_pieces.share(list(cached.pending), cached.pending.clear, lambda: self.cache.drop(sha, cached))
            return cached.values
        if image.pixels is None:  # evicted since the prompt was prepared
            image.pixels, _ = self._preprocess(image.input)
        tower = self.vlm.vision_tower
        pixels = mx.array(image.pixels).astype(tower.patch_embed.proj.weight.dtype)
        with tower_pieces.recording() as work:
            values = tower(pixels, mx.array([image.grid]), output_hidden_states=False)
            work.arrays.append(values)  # the merger after the blocks
            features = Features(grid=image.grid, values=values, pending=list(work.arrays))
            work.done.append(features.pending.clear)
            work.failed.append(lambda: self.cache.drop(sha, features))
        image.pixels = None
        self.cache.put(sha, features)
        return values

    def positions(self, prompt: EncodedPrompt) -> Optional[Positions]:
        if not prompt.images:
            return None
        if prompt._positions is None:
            grids = mx.array([list(image.grid) for image in prompt.images])
            ids, deltas = self.vlm.language_model.get_rope_index(mx.array([prompt.tokens]), image_grid_thw=grids)
            prompt._positions = Positions(ids=ids, delta=int(deltas.reshape(-1)[0].item()))
        return prompt._positions

    def embeddings(self, prompt: EncodedPrompt, start: int):
        positions = self.positions(prompt)
        embed = self.vlm.language_model.model.embed_tokens
        tokens = prompt.tokens
        segments = []
        cursor = start
        for image in prompt.images:
            end = image.start + image.n_tokens
            if end <= start:
                continue  # already in the cache
            if image.start > cursor:
                segments.append(embed(mx.array(tokens[cursor : image.start])))
            values = self._features(image)
            segments.append(values[max(start, image.start) - image.start :])
            cursor = end
        if not segments:
            return None, positions, {}  # no image left to feed: plain tokens will do
        if cursor < len(tokens):
            segments.append(embed(mx.array(tokens[cursor:])))
        # The embedding's output dtype, not its weight's: a quantized table's
        # weight is packed uint32 (casting to it turns features into integers).
        dtype = embed(mx.array(tokens[:1])).dtype
        return mx.concatenate([s.astype(dtype) for s in segments], axis=0), positions, {}


# ---------------------------------------------------------------- generic

# Outputs of get_input_embeddings that feed decoding steps too (cross-attention
# and encoder-decoder models): the one loop passes inputs on prefill only.
_DECODE_INPUTS = {"cross_attention_states", "cross_attention_mask", "full_text_row_masked_out_mask",
                  "decoder_inputs_embeds"}
# Where some mlx-vlm language models keep the positions get_input_embeddings planned.
_OWN_PLAN = ("_position_ids", "_rope_deltas")


class GenericEncoder:
    def __init__(self, vlm, processor, limits: ImageLimits, image_token_id: Optional[int]):
        self.vlm = vlm
        self.processor = processor
        self.limits = limits
        self.image_token_id = image_token_id

    def encode(self, rendered: str, images: list[ImageInput]) -> EncodedPrompt:
        pictures = [decode_image(image, self.limits) for image in images]
        try:
            inputs = self._prepare(rendered, pictures)
        except Exception as exc:
            if pictures and self._fails_on_any_image(rendered, len(pictures)):
                raise WorkerError(
                    errors.GENERATION_FAILED,
                    f"model type {self.vlm.config.model_type!r}: its image processor fails on every image with "
                    f"the installed libraries (mlx-vlm's own generate fails the same way): {exc}; "
                    "messages without images work",
                ) from None
            raise WorkerError(
                errors.IMAGE_INVALID, f"the model's processor rejected the prompt: {exc}",
                {"field": "params.messages", "reason": "unprocessable"},
            ) from None
        tokens = [int(t) for t in inputs.pop("input_ids")[0].tolist()]
        key: list = list(tokens)
        if images:
            # Image tokens cannot be told apart per image here: key them by all images.
            combined = hashlib.sha256("|".join(i.sha256 for i in images).encode()).hexdigest()
            if self.image_token_id is None:
                key = [(t, combined) for t in tokens]
            else:
                key = [f"img:{combined}:{k}" if t == self.image_token_id else t for k, t in enumerate(tokens)]
        return EncodedPrompt(tokens=tokens, cache_key=key, encoder=self, images=list(images), extra=inputs)

    def _prepare(self, rendered: str, pictures: list) -> dict:
        from mlx_vlm.utils import prepare_inputs

        return prepare_inputs(
            self.processor,
            images=pictures or None,
            prompts=rendered,
            image_token_index=self.image_token_id,
            add_special_tokens=False,
            padding=False,
        )

    def _fails_on_any_image(self, rendered: str, n: int) -> bool:
        """Whether the processor also fails on plain small pictures: then the
        fault is the model's processor under these libraries, not the image."""
        from PIL import Image

        try:
            self._prepare(rendered, [Image.new("RGB", (64, 64), (128, 128, 128)) for _ in range(n)])
        except Exception:
            return True
        return False

    def embeddings(self, prompt: EncodedPrompt, start: int):
        extra = dict(prompt.extra)
        pixel_values = extra.pop("pixel_values", None)
        mask = extra.pop("attention_mask", None)
        lm = self.vlm.language_model
        for name in _OWN_PLAN:  # a plan left by an earlier prompt must not stand in for this one's
            if hasattr(lm, name):
                setattr(lm, name, None)
        out = self.vlm.get_input_embeddings(mx.array([prompt.tokens]), pixel_values, mask=mask, **extra)
        outputs = {k: v for k, v in out.to_dict().items() if v is not None}
        refused = sorted(_DECODE_INPUTS & set(outputs))
        if refused:
            raise WorkerError(
                errors.GENERATION_FAILED,
                f"model type {self.vlm.config.model_type!r} needs inputs on every decoding step, "
                f"which this worker does not pass: {refused}",
            )
        ids, deltas = out.position_ids, out.rope_deltas
        if ids is None:
            # GLM-4V style: get_input_embeddings keeps the image positions inside
            # the language model instead of returning them. The wrapper passes
            # positions explicitly on every call, so take the model's plan.
            ids, deltas = (getattr(lm, name, None) for name in _OWN_PLAN)
        positions = None
        if ids is not None and ids.ndim == 3 and deltas is not None:
            positions = Positions(ids=ids, delta=int(mx.array(deltas).reshape(-1)[0].item()))
        # Everything else goes to the language model on prefill, whole-prompt,
        # with the processor's other outputs, as mlx-vlm's generate passes them.
        skip = {"inputs_embeds", "attention_mask"} | ({"position_ids", "rope_deltas"} if positions else set())
        passed = {**extra, **{k: v for k, v in outputs.items() if k not in skip}}
        return out.inputs_embeds[0, start:], positions, passed

"""Vision-language models: the vision loader, images, and the adapter to the
one loop (protocol/README.md, "Images"). Modules: ``images`` (sources ->
checked pictures), ``messages`` (chat -> image inputs), ``encoders`` (prompt +
images -> tokens, key, embeddings), ``features`` (vision-tower cache), ``lm``
(the language model shaped like mlx-lm's), ``adapter`` (params -> prompt).
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import protocol
from ..models.config import text_config
from ..models.loading import LoadProgress, evaluate_weights
from ..cache.kv_quant import check_model as check_kv_layers
from ..models.fixups import finish_tokenizer
from ..models.loader import Loaded, Loader
from .adapter import VisionAdapter
from .encoders import GenericEncoder, QwenEncoder
from .features import DEFAULT_IMAGE_CACHE_BYTES, FeatureCache
from .images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGES, ImageLimits
from . import tower_pieces
from .lm import wrap_language_model

__all__ = ["LOADER", "load_vision_model", "VisionAdapter"]


def _option(params: protocol.LoadParams, name: str, default: int) -> int:
    value = getattr(params, name)  # bounds: protocol.LoadParams
    return default if value is None else value


def _eos_token_ids(processor, hf_tokenizer, config: dict) -> list[int]:
    """The ids mlx-vlm's own generate stops on: its stopping criteria hold
    config.json's eos_token_id as generation_config.json overrides it, plus
    the tokenizer's EOS."""
    criteria = getattr(hf_tokenizer, "stopping_criteria", None) or getattr(processor, "stopping_criteria", None)
    ids = getattr(criteria, "eos_token_ids", None)
    if not ids:  # a null in text_config must not hide the top-level value
        tcfg = text_config(config)
        ids = next((v for v in (tcfg.get("eos_token_id"), config.get("eos_token_id")) if v is not None), None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return [int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool)]


def load_vision_model(path: Path, config: dict, params: protocol.LoadParams, progress: LoadProgress) -> Loaded:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mlx_vlm import load as mlx_vlm_load
    from mlx_vlm.prompt_utils import SINGLE_IMAGE_ONLY_MODELS

    limits = ImageLimits(
        max_images=_option(params, "max_images", DEFAULT_MAX_IMAGES),
        max_pixels=_option(params, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
        max_bytes=_option(params, "max_image_bytes", DEFAULT_MAX_IMAGE_BYTES),
    )
    # Lazy: the model is built over unread weights, read below group by group.
    vlm, processor = progress.step(
        "tokenizer", lambda: mlx_vlm_load(str(path), trust_remote_code=params.trust_remote_code, lazy=True)
    )
    tokenizer = _tokenizer(processor, config, params.chat_template)
    model_type = str(config.get("model_type", ""))
    model = wrap_language_model(vlm, mrope=hasattr(vlm.language_model, "get_rope_index"))
    if params.kv_bits is not None:  # before any weight is read
        check_kv_layers(model)
    evaluate_weights(vlm, progress)
    tower_pieces.mark(vlm)
    cache_bytes = _option(params, "image_cache_bytes", DEFAULT_IMAGE_CACHE_BYTES)
    encoder = _encoder(vlm, processor, model_type, limits, cache_bytes)
    max_images, why = limits.max_images, "the load option `max_images`"
    if model_type in SINGLE_IMAGE_ONLY_MODELS and max_images > 1:
        max_images, why = 1, f"model type {model_type!r}"
    adapter = VisionAdapter(model, processor, encoder, model_type, limits, max_images, why)
    return Loaded("vision", model, tokenizer, vision=adapter)


def _tokenizer(processor, config: dict, chat_template):
    """mlx-lm's TokenizerWrapper over the processor's tokenizer (mlx-vlm
    doesn't wrap it), its tool parser picked by the template it will use."""
    from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer, TokenizerWrapper

    from ..tools.markers import tool_parser_options

    hf_tokenizer = getattr(processor, "tokenizer", processor)
    if chat_template is not None:  # before the tool parser is picked from it
        hf_tokenizer.chat_template = chat_template
    detokenizer = getattr(processor, "detokenizer", None)
    tokenizer = TokenizerWrapper(
        hf_tokenizer,
        type(detokenizer) if detokenizer is not None else NaiveStreamingDetokenizer,
        eos_token_ids=_eos_token_ids(processor, hf_tokenizer, config),
        **tool_parser_options(hf_tokenizer),
    )
    finish_tokenizer(tokenizer, chat_template, processor)
    return tokenizer


def _encoder(vlm, processor, model_type: str, limits: ImageLimits, cache_bytes: int):
    # MLX_WORKER_VISION_ENCODER=generic forces the whole-prompt path (a fallback
    # to compare against, should the per-image path misbehave for a model).
    generic = os.environ.get("MLX_WORKER_VISION_ENCODER", "").lower() == "generic"
    if model_type in QwenEncoder.MODEL_TYPES and not generic:
        return QwenEncoder(vlm, processor, FeatureCache(cache_bytes), limits)
    image_token = getattr(vlm.config, "image_token_id", None)
    if image_token is None:
        image_token = getattr(vlm.config, "image_token_index", None)
    return GenericEncoder(vlm, processor, limits, image_token)


def _is_vision(path: Path, config: dict, params: protocol.LoadParams) -> bool:
    return "vision_config" in config


LOADER = Loader(load_vision_model, claims=_is_vision)

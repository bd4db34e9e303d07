"""Vision-language models: loading, images, and the adapter to the one loop.

- ``images``: image sources -> checked bytes, content hash, decoded picture.
- ``messages``: chat messages -> image inputs and the rendered prompt.
- ``encoders``: rendered prompt + images -> tokens, cache key, embeddings.
- ``features``: vision-tower outputs cached by image content hash.
- ``lm``: the language model shaped like an mlx-lm model (M-RoPE positions).
- ``adapter``: params -> PreparedPrompt, used by prompt.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import protocol
from ..models.config import text_config
from ..models.loading import LoadProgress, evaluate_weights
from ..cache.kv_quant import check_model as check_kv_layers
from ..models.loaded import LoadedModel, new_loaded_model
from .adapter import VisionAdapter
from .encoders import GenericEncoder, QwenEncoder
from .features import DEFAULT_IMAGE_CACHE_BYTES, FeatureCache
from .images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGES, ImageLimits
from .lm import wrap_language_model

__all__ = ["load_vision_model", "VisionAdapter"]


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


def load_vision_model(
    path: Path, config: dict, params: protocol.LoadParams, progress: LoadProgress, kv_quantized: bool
) -> LoadedModel:
    limits = ImageLimits(
        max_images=_option(params, "max_images", DEFAULT_MAX_IMAGES),
        max_pixels=_option(params, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
        max_bytes=_option(params, "max_image_bytes", DEFAULT_MAX_IMAGE_BYTES),
    )
    cache_bytes = _option(params, "image_cache_bytes", DEFAULT_IMAGE_CACHE_BYTES)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer, TokenizerWrapper
    from mlx_vlm import load as mlx_vlm_load
    from mlx_vlm.prompt_utils import SINGLE_IMAGE_ONLY_MODELS

    from ..tools.markers import extend_thinking, tool_parser_options

    # Lazy: the model is built over unread weights, read below group by group.
    vlm, processor = progress.step(
        "tokenizer", lambda: mlx_vlm_load(str(path), trust_remote_code=params.trust_remote_code, lazy=True)
    )
    hf_tokenizer = getattr(processor, "tokenizer", processor)
    if params.chat_template is not None:
        hf_tokenizer.chat_template = params.chat_template
        if hasattr(processor, "chat_template"):
            processor.chat_template = params.chat_template

    eos = _eos_token_ids(processor, hf_tokenizer, config)
    detokenizer = getattr(processor, "detokenizer", None)
    tokenizer = TokenizerWrapper(
        hf_tokenizer,
        type(detokenizer) if detokenizer is not None else NaiveStreamingDetokenizer,
        eos_token_ids=eos,
        **tool_parser_options(hf_tokenizer),
    )
    from ..tools.formats import install

    install(tokenizer)
    extend_thinking(tokenizer)

    model_type = str(config.get("model_type", ""))
    model = wrap_language_model(vlm, mrope=hasattr(vlm.language_model, "get_rope_index"))
    if kv_quantized:  # before any weight is read
        check_kv_layers(model)
    evaluate_weights(vlm, progress)
    # MLX_WORKER_VISION_ENCODER=generic forces the whole-prompt path (a fallback
    # to compare against, should the per-image path misbehave for a model).
    generic = os.environ.get("MLX_WORKER_VISION_ENCODER", "").lower() == "generic"
    if model_type in QwenEncoder.MODEL_TYPES and not generic:
        encoder = QwenEncoder(vlm, processor, FeatureCache(cache_bytes), limits)
    else:
        image_token = getattr(vlm.config, "image_token_id", None)
        if image_token is None:
            image_token = getattr(vlm.config, "image_token_index", None)
        encoder = GenericEncoder(vlm, processor, limits, image_token)

    max_images, why = limits.max_images, "the load option `max_images`"
    if model_type in SINGLE_IMAGE_ONLY_MODELS and max_images > 1:
        max_images, why = 1, f"model type {model_type!r}"
    adapter = VisionAdapter(model, processor, encoder, model_type, limits, max_images, why)

    return new_loaded_model(path, "vision", model, tokenizer, config, vision=adapter)

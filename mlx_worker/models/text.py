"""The text loader: a language model folder through mlx-lm."""

from __future__ import annotations

import os
from pathlib import Path

from .. import protocol
from ..cache.kv_quant import check_model as check_kv_layers
from .fixups import finish_tokenizer
from .loader import Loaded, Loader
from .loading import LoadProgress, evaluate_weights


def load_text_model(path: Path, config: dict, params: protocol.LoadParams, progress: LoadProgress) -> Loaded:
    from mlx_lm import load as mlx_lm_load

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer_config: dict = {"trust_remote_code": params.trust_remote_code}
    # Lazy: the model is built over unread weights, read below group by group.
    model, tokenizer = progress.step("tokenizer", lambda: mlx_lm_load(
        str(path), tokenizer_config=tokenizer_config, trust_remote_code=params.trust_remote_code, lazy=True
    ))
    if params.kv_bits is not None:  # before any weight is read
        check_kv_layers(model)
    evaluate_weights(model, progress)
    finish_tokenizer(tokenizer, params.chat_template)
    return Loaded("text", model, tokenizer)


LOADER = Loader(load_text_model)

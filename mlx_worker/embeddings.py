"""Embedding models: their loader, and ``embed`` (protocol/README.md, "embed").

A folder is an embedding model when it ships sentence-transformers' files,
when its architecture can only encode, or when ``load {embedding: true}`` says
so. mlx-embeddings (else mlx-lm's decoder) builds the model; the worker pools
the last hidden states as the folder's pooling config says. Inputs run in
batches of similar length; between batches a cancel is honoured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

from . import errors, memory, protocol
from .errors import WorkerError
from .models.loaded import LoadedModel
from .models.loader import Loaded, Loader
from .models.loading import LoadProgress, evaluate_weights
from .models.config import text_config

# Architectures that only encode: always embedding models.
ENCODERS = {"bert", "modernbert", "xlm_roberta", "xlm-roberta", "nomic_bert", "roberta"}
# Decoders whose hidden states are pooled at the last token by default.
POOLING_FILE = Path("1_Pooling") / "config.json"
BATCH_TOKENS = 4096  # padded tokens per forward pass


def is_embedding_folder(path: Path, config: dict) -> bool:
    if str(config.get("model_type", "")).lower() in ENCODERS:
        return True
    return any((path / name).exists() for name in ("modules.json", "config_sentence_transformers.json", "1_Pooling"))


def pooling_of(path: Path, config: dict) -> str:
    """``last_token``, ``mean``, ``cls`` or ``max``: the folder's
    sentence-transformers pooling, else the architecture's usual one."""
    try:
        cfg = json.loads((path / POOLING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = None
    if isinstance(cfg, dict):
        for key, name in (("pooling_mode_lasttoken", "last_token"), ("pooling_mode_cls_token", "cls"),
                          ("pooling_mode_max_tokens", "max"), ("pooling_mode_mean_tokens", "mean")):
            if cfg.get(key) is True:
                return name
    return "mean" if str(config.get("model_type", "")).lower() in ENCODERS else "last_token"


class _DecoderHidden:
    """An mlx-lm language model as an embedding model: the final hidden
    states of its inner model (after the last norm). Right padding needs no
    mask under causal attention: no real token attends to a later pad."""

    def __init__(self, model):
        self.model = model

    def parameters(self):
        return self.model.parameters()

    def __call__(self, tokens, attention_mask=None):
        return _Hidden(self.model.model(tokens))


class _Hidden:
    def __init__(self, last_hidden_state):
        self.last_hidden_state = last_hidden_state


def _mlx_embeddings_has(config: dict) -> bool:
    import importlib.util

    name = str(config.get("model_type", "")).replace("-", "_")
    return bool(name) and importlib.util.find_spec(f"mlx_embeddings.models.{name}") is not None


def claims(path: Path, config: dict, params: protocol.LoadParams) -> bool:
    """Whether the folder loads as an embedding model (``load {embedding}``,
    else detected); the options that only generation uses are refused."""
    detected = is_embedding_folder(path, config)
    wanted = detected if params.embedding is None else params.embedding
    if not wanted:
        if str(config.get("model_type", "")).lower() in ENCODERS:
            raise errors.invalid_params("params.embedding", f"{path} is an encoder ({config.get('model_type')}): "
                                        "it can only be loaded as an embedding model")
        return False
    if "vision_config" in config:
        raise errors.invalid_params("params.embedding", "vision embedding models are not supported")
    for name in ("draft_model_id", "num_draft_tokens", "kv_bits", "max_kv_size", "parallel"):
        if getattr(params, name) is not None:
            raise errors.invalid_params(f"params.{name}", f"{name} is for generation; this folder loads as an "
                                        "embedding model (pass embedding: false to load it for generation)")
    return True


def load(path: Path, config: dict, params: protocol.LoadParams, progress: LoadProgress) -> Loaded:
    """mlx-embeddings' class for the architecture when it has one, else the
    decoder's mlx-lm class (its hidden states)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = progress.step("tokenizer", lambda: load_tokenizer(
        path, {"trust_remote_code": params.trust_remote_code}))
    if _mlx_embeddings_has(config):
        from mlx_embeddings.utils import load_model

        model = load_model(path, lazy=True, path_to_repo=str(path))
    else:
        from mlx_lm.utils import load_model

        model = _DecoderHidden(load_model(path, lazy=True, strict=False,
                                          trust_remote_code=params.trust_remote_code)[0])
    evaluate_weights(model, progress)
    return Loaded("embedding", model, tokenizer, pooling=pooling_of(path, config),
                  dimensions=text_config(config).get("hidden_size"))


LOADER = Loader(load, claims=claims)


# ------------------------------------------------------------------- embed


def inputs_of(lm: LoadedModel, params: protocol.EmbedParams) -> list[list[int]]:
    """Token ids of each input (text encoded with the model's tokenizer)."""
    raw = params.input
    if isinstance(raw, str):
        items: list = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [list(raw)]  # one input given as token ids
    else:
        items = list(raw)
    if not items:
        raise errors.invalid_params("params.input", "input is empty: give a string, strings or token ids")
    out = []
    for i, item in enumerate(items):
        field = f"params.input[{i}]" if not isinstance(raw, str) else "params.input"
        if isinstance(item, str):
            ids = lm.tokenizer.encode(item)
        elif isinstance(item, list):
            ids = item
            bad = next((t for t in ids if t >= lm.vocab_size), None)
            if bad is not None:
                raise errors.invalid_params(field, f"token id {bad} is outside the vocabulary [0, {lm.vocab_size})")
        else:
            raise errors.invalid_params(field, "a token id may not stand beside strings or token lists")
        if not ids:
            raise errors.invalid_params(field, "this input has no tokens")
        limit = lm.context_length
        if limit is not None and len(ids) > limit:
            if not params.truncate:
                raise WorkerError(errors.CONTEXT_OVERFLOW,
                                  f"input {i} is {len(ids)} tokens; the model takes at most {limit} (truncate: true cuts it)",
                                  {"field": field, "prompt_tokens": len(ids), "context_length": limit})
            ids = ids[:limit]
        out.append(ids)
    dims = params.dimensions
    full = lm.dimensions
    if dims is not None and full and dims > full:
        raise errors.invalid_params("params.dimensions", f"dimensions must be at most the model's {full}")
    return out


def batches(lengths: list[int], budget: int = BATCH_TOKENS) -> list[list[int]]:
    """Input indices grouped by similar length, each group's padded size within ``budget``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[i] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def need_bytes(lm: LoadedModel, batch: int, length: int) -> int:
    """Activations of one padded batch (one layer's temporaries at a time,
    as memory.generate_need counts them, plus the attention scores)."""
    cfg = text_config(lm.config)
    hidden = int(cfg.get("hidden_size") or 0)
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    heads = int(cfg.get("num_attention_heads") or 1)
    tokens = batch * length
    return int((tokens * (8 * hidden + 4 * inter) * 4 + (heads + 1) * batch * length * length * 4) * 1.1)


def admit(lm: LoadedModel, ids: list[list[int]], outstanding: int) -> None:
    """-32005 when the largest batch would not fit beside what the running
    generations may still need (an embed can't wait: it runs now)."""
    import mlx.core as mx

    lengths = [len(x) for x in ids]
    need = max(need_bytes(lm, len(g), max(lengths[i] for i in g)) for g in batches(lengths))
    parts = {"activations": need}
    if lm.memory_limit and lm.memory_bytes + need > lm.memory_limit:
        raise memory.refusal("embed", need, lm.memory_limit - lm.memory_bytes, lm.memory_limit, "model", parts)
    limit = memory.worker_limit()
    available = limit - mx.get_active_memory() - outstanding
    if need > available:
        raise memory.refusal("embed", need, available, limit, "worker", parts)


def embed(lm: LoadedModel, params: protocol.EmbedParams, should_stop: Callable[[], bool],
          between: Optional[Callable[[], None]] = None, outstanding: int = 0) -> protocol.EmbedResult:
    import mlx.core as mx

    ids = inputs_of(lm, params)
    admit(lm, ids, outstanding)
    lengths = [len(x) for x in ids]
    pad = _pad_id(lm)
    vectors: list = [None] * len(ids)
    for n, group in enumerate(batches(lengths)):
        if should_stop():
            raise WorkerError(errors.CANCELLED, "the embed was cancelled")
        if n and between is not None:
            between()
        width = max(lengths[i] for i in group)
        tokens = mx.array([ids[i] + [pad] * (width - lengths[i]) for i in group], dtype=mx.int32)
        mask = mx.array([[1] * lengths[i] + [0] * (width - lengths[i]) for i in group], dtype=mx.int32)
        hidden = lm.model(tokens, attention_mask=mask).last_hidden_state.astype(mx.float32)
        pooled = pool(hidden, mask, lm.pooling or "last_token")
        if params.dimensions is not None:
            pooled = pooled[:, : params.dimensions]  # Matryoshka: the leading dimensions
        if params.normalize:
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        rows = pooled.tolist()
        for i, row in zip(group, rows):
            vectors[i] = row
        mx.clear_cache()
    for i, row in enumerate(vectors):
        if not all(math.isfinite(v) for v in row):
            raise WorkerError(errors.GENERATION_FAILED, f"the model produced a non-finite embedding for input {i}")
    return protocol.EmbedResult(model_id=lm.model_id, embeddings=vectors, tokens=lengths,
                                dimensions=len(vectors[0]), usage=protocol.EmbedUsage(prompt_tokens=sum(lengths)))


def pool(hidden, mask, how: str):
    """(batch, length, dim) hidden states -> (batch, dim), padding left out."""
    import mlx.core as mx

    m = mask.astype(mx.float32)[..., None]
    if how == "last_token":
        last = mask.sum(axis=1) - 1
        return hidden[mx.arange(hidden.shape[0]), last]
    if how == "cls":
        return hidden[:, 0]
    if how == "max":
        return mx.where(m > 0, hidden, -mx.inf).max(axis=1)
    return (hidden * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1e-9)


def _pad_id(lm: LoadedModel) -> int:
    pad = getattr(lm.hf_tokenizer, "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    return lm.eos_token_ids[0] if lm.eos_token_ids else 0

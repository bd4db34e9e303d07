"""Quantized KV caches: load's ``kv_bits`` / ``kv_group_size``.

Every plain KV layer is a ``QuantizedKVCache`` from the first token (mlx-lm's
``quantized_kv_start`` converts mid-stream, so its output depends on where the
conversion fell): cached == uncached, whatever the chunking.
Spec: protocol/README.md § Quantized KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .. import errors, protocol
from ..models.config import text_config

DEFAULT_GROUP_SIZE = 64  # mlx-lm's


@dataclass(frozen=True)
class KVQuant:
    bits: int
    group_size: int

    def element_bytes(self, itemsize: int) -> float:
        """Bytes per cached element: the packed bits plus each group's scale and bias."""
        return self.bits / 8 + 2 * itemsize / self.group_size


def head_dims(config: dict) -> list[int]:
    """The key and value head dims config.json declares (MLA-style models name both)."""
    cfg = text_config(config)
    dims = [cfg.get(k) for k in ("head_dim", "v_head_dim")]
    dims = [d for d in dims if isinstance(d, int) and not isinstance(d, bool) and d > 0]
    if not dims:
        hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
        if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            dims = [hidden // heads]
    return dims


def from_load(params: protocol.LoadParams, config: dict) -> Optional[KVQuant]:
    """The load's KV quantization, checked against what config.json says
    (before any weight is read); None without ``kv_bits``."""
    if params.kv_bits is None:
        if params.kv_group_size is not None:
            raise errors.invalid_params("params.kv_group_size", "kv_group_size needs kv_bits (4 or 8)")
        return None
    if params.max_kv_size is not None:  # first: whatever the group size, this is refused
        raise errors.invalid_params(
            "params.kv_bits",
            "a quantized KV cache can't rotate: load with kv_bits or with max_kv_size, not both",
        )
    quant = KVQuant(params.kv_bits, params.kv_group_size or DEFAULT_GROUP_SIZE)
    for dim in head_dims(config):
        if dim % quant.group_size:
            raise errors.invalid_params(
                "params.kv_group_size",
                f"kv_group_size {quant.group_size} does not divide the model's head dim {dim} "
                f"(use {', '.join(str(g) for g in (32, 64, 128) if dim % g == 0) or 'no quantized KV cache'})",
            )
    return quant


def check_layers(cache: list) -> None:
    """Refuse a model whose own cache has windowed layers (sliding-window
    attention, e.g. Gemma 3): mlx-lm has no rotating quantized cache."""
    from mlx_lm.models.cache import CacheList, RotatingKVCache

    windowed = [c for c in cache if isinstance(c, (RotatingKVCache, CacheList))]
    if windowed:
        raise errors.invalid_params(
            "params.kv_bits",
            f"this model has {len(windowed)} sliding-window (rotating) cache layers, which can't be "
            "quantized; load it without kv_bits",
        )


def check_model(model) -> None:
    """Refuse kv_bits for a model whose own cache has windowed layers."""
    from mlx_lm.models.cache import make_prompt_cache

    check_layers(make_prompt_cache(model))


def quantize_layers(cache: list, quant: Optional[KVQuant]) -> list:
    """A fresh cache with its plain KV layers made quantized (others kept)."""
    if quant is None:
        return cache
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    return [QuantizedKVCache(quant.group_size, quant.bits) if type(c) is KVCache else c for c in cache]

"""What one generation adds to MLX's peak memory, term by term.

The estimate follows what MLX allocates: the cache per layer type and dtype,
the largest prefill chunk's temporaries one layer at a time, decoding's
growing copy and logits, a batch's padding, merge copy and shared prefill
chunks; constants fitted to measured peaks, rounded up.
Spec: protocol/README.md § Memory limits; the terms and their measurements:
bench/results/design-notes.md § layers, bench/memory.py.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Optional

from .models.config import text_config

KV_STEP = 256  # mlx-lm's KVCache grows in steps of this many tokens
MARGIN = 1.04
FIXED = 256 << 10  # per request: token buffers, sampling state, small arrays (measured ~100-200 KiB)
# Bytes of a layer's projection/MLP temporaries per chunk token, in units of
# (hidden, intermediate) × itemsize; fitted (fp32 and bf16 differ: bf16
# matmuls and norms keep some fp32 temporaries on CPU).
LINEAR = {4: (8.0, 4.0), 2: (12.0, 6.0)}
_LAYOUTS: "weakref.WeakKeyDictionary[object, Layout]" = weakref.WeakKeyDictionary()  # per loaded model


@dataclass
class Layout:
    """A model's shapes, read once per loaded model (kept in ``_LAYOUTS``)."""

    layers: list  # per layer: ("kv",) | ("window", size) | ("quant", element_bytes) | ("state", bytes)
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    inter: int
    vocab: int
    itemsize: int
    gpu: bool

    def kv_token_bytes(self, element: float) -> float:
        return 2 * self.kv_heads * self.head_dim * element


def _positive_int(cfg: dict, *keys: str) -> Optional[int]:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _float_itemsize(model: Any) -> int:
    """Bytes per element of the model's activations (its float weights' dtype;
    a quantized layer's scales are in it too)."""
    try:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        for _, p in tree_flatten(model.parameters()):
            if isinstance(p, mx.array) and mx.issubdtype(p.dtype, mx.floating):
                return p.dtype.size
    except Exception:
        pass
    return 4


def layout(lm) -> Layout:
    cached = _LAYOUTS.get(lm)
    if cached is not None:
        return cached
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache, RotatingKVCache

    from .cache.store import make_cache

    cfg = text_config(lm.config)
    hidden = _positive_int(cfg, "hidden_size", "n_embd", "d_model") or 0
    heads = _positive_int(cfg, "num_attention_heads", "n_head") or 1
    kv_heads = _positive_int(cfg, "num_key_value_heads") or heads
    head_dim = _positive_int(cfg, "head_dim") or (hidden // heads if hidden else 0)
    inter = _positive_int(cfg, "intermediate_size", "n_inner") or 4 * hidden
    itemsize = _float_itemsize(lm.model)
    layers: list = []
    try:
        cache = make_cache(lm)
    except Exception:
        cache = []
    for c in cache:
        if isinstance(c, RotatingKVCache):
            layers.append(("window", c.max_size))
        elif isinstance(c, QuantizedKVCache):
            layers.append(("quant", c.bits / 8 + 2 * itemsize / c.group_size))
        elif isinstance(c, KVCache):
            layers.append(("kv",))
        elif isinstance(c, ArraysCache):
            layers.append(("state", _state_bytes(lm, cfg, itemsize)))
        else:
            layers.append(("kv",))
    if not layers:
        n = _positive_int(cfg, "num_hidden_layers", "n_layer", "num_layers") or 0
        layers = [("kv",)] * n
    out = Layout(layers, heads, kv_heads, head_dim, hidden, inter, lm.vocab_size, itemsize,
                 mx.default_device().type == mx.DeviceType.gpu)
    _LAYOUTS[lm] = out
    return out


def _state_bytes(lm, cfg: dict, itemsize: int) -> int:
    """A recurrent layer's state: measured once from a one-token forward pass
    (its size doesn't depend on the sequence length)."""
    try:
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_lm.models.cache import ArraysCache

        cache = lm.model.make_cache() if hasattr(lm.model, "make_cache") else None
        if cache:
            lm.model(mx.array([[0]], dtype=mx.uint32), cache=cache)
            sizes = [sum(v.nbytes for _, v in tree_flatten(c.state) if isinstance(v, mx.array))
                     for c in cache if isinstance(c, ArraysCache)]
            if sizes:
                return max(sizes)
    except Exception:
        pass
    inter = _positive_int(cfg, "intermediate_size") or 2 * (_positive_int(cfg, "hidden_size") or 0)
    return inter * ((_positive_int(cfg, "state_size") or 16) + (_positive_int(cfg, "conv_kernel") or 4)) * 4


def cache_bytes(lay: Layout, tokens: int, chunk: int, decoding: bool) -> int:
    """The cache holding ``tokens`` (while prefilling in ``chunk``s, or decoding)."""
    total = 0.0
    kv = lay.kv_token_bytes(lay.itemsize)
    for layer in lay.layers:
        kind = layer[0]
        if kind == "kv":
            total += kv * math.ceil(tokens / KV_STEP) * KV_STEP
        elif kind == "window":
            size = layer[1]
            held = min(tokens, size if decoding else size + chunk - 1)
            # a window not yet full grows in steps too while decoding
            total += kv * (min(size, math.ceil(held / KV_STEP) * KV_STEP) if decoding else held)
        elif kind == "quant":
            total += lay.kv_token_bytes(layer[1]) * math.ceil(tokens / KV_STEP) * KV_STEP
        else:
            total += layer[1]
    return int(total)


def _attention(lay: Layout, c: int, keys: int, quant: bool) -> float:
    """One attention layer's temporaries for a chunk of ``c`` queries over ``keys`` keys."""
    if c <= 0:
        return 0.0
    out = 0.0
    if c > 1:
        out += c * keys  # the causal mask (bool)
        if not lay.gpu or quant:
            out += lay.heads * c * keys * lay.itemsize  # scores
    if lay.kv_heads != lay.heads or quant:
        out += 2 * lay.heads * keys * lay.head_dim * lay.itemsize  # K, V broadcast (or dequantized)
    return out


def chunk_bytes(lay: Layout, c: int, keys: int) -> int:
    """The temporaries of one forward chunk of ``c`` tokens with ``keys`` keys after it."""
    if not lay.layers:
        return 0
    a, b = LINEAR.get(lay.itemsize, LINEAR[4])
    linear = c * (a * lay.hidden + b * lay.inter) * lay.itemsize
    worst = 0.0
    for kind in {layer[0] for layer in lay.layers}:
        if kind == "state":
            # a recurrent scan's per-token steps and outputs (mlx-lm's Mamba
            # loops over the chunk; fitted)
            worst = max(worst, 8 * c * lay.inter * lay.itemsize)
            continue
        if kind == "window":
            size = min(layer[1] for layer in lay.layers if layer[0] == "window")
            k = min(keys, size + c - 1)
        else:
            k = keys
        worst = max(worst, _attention(lay, c, k, kind == "quant"))
    return int(linear + worst)


def chunks(n_prompt: int, cached: int, step: int) -> list[tuple[int, int]]:
    """(chunk, keys after it) of the prefill's last two chunks: the largest
    temporaries are in one of them (full chunks grow with their keys; the
    last, shorter one has the most keys). The prompt's last token is fed by
    the first decode step."""
    todo = n_prompt - 1 - cached
    if todo <= 0:
        return []
    step = max(1, step)
    full, rest = divmod(todo, step)
    out = []
    if full:
        out.append((step, cached + full * step))
    if rest:
        out.append((rest, n_prompt - 1))
    return out


def kv_token_bytes(lm) -> int:
    """Bytes one more token adds to the plain KV layers (what a batch pads)."""
    lay = layout(lm)
    return int(sum(lay.kv_token_bytes(lay.itemsize) for layer in lay.layers if layer[0] == "kv"))


def padded(lm, rows: list[tuple[int, int]]) -> tuple[int, int]:
    """A decode batch of ``rows`` (prompt, max_tokens): the bytes it holds
    over the rows' own caches (mlx-lm's BatchKVCache left-pads every row to
    the longest prompt and grows them all together), and the copy a merge
    makes (old and merged arrays alive together, between prefill chunks)."""
    if len(rows) < 2:
        return 0, 0
    per_token = kv_token_bytes(lm)
    length = math.ceil((max(p for p, _ in rows) + max(m for _, m in rows)) / KV_STEP) * KV_STEP
    own = sum(math.ceil((p + m) / KV_STEP) * KV_STEP for p, m in rows)
    return int(per_token * max(0, len(rows) * length - own) * MARGIN), int(per_token * len(rows) * length * MARGIN)


def temporaries(need: int, parts: dict, prefilled: bool) -> int:
    """What a request may still add beyond its KV (``need`` and ``parts``
    from ``generate_need``): all of it while its prompt is to be prefilled;
    once it decodes, the prefill's excess over the decode peak is behind it
    (that peak, if it was the largest, is already in MLX's peak and in the
    estimates made meanwhile). A draft pair keeps its whole figure."""
    out = need - parts.get("kv_cache", 0)
    if prefilled and "draft" not in parts:
        out -= int(max(0, parts.get("prefill", 0) - parts.get("decode", 0)) * MARGIN)
    return max(0, out)


def shallow_limit(step: int) -> int:
    """A prompt this far into its cache still prefills together with others
    (the scheduler's rule: merging a deeper one would copy all its KV every chunk)."""
    return max(4 * step, 256)


def co_prefill(lm, rows: list[tuple[int, int, int, int]], step: int, batch: list[tuple[int, int]]) -> int:
    """The worst shared prefill chunk of prompts of one model, played out
    from admission as the scheduler runs them: every row still shallow with
    tokens left shares a round, its cache merged into a left-padded batch
    (a copy) and its input right-padded to the widest chunk over the
    deepest row's keys; a row out of the round holds its KV to max_tokens
    (padded, when it decodes in the batch). ``step`` is the widest chunk:
    chunks sized for running streams are narrower and stop sharing sooner.

    Args:
        rows: (processed, prompt length, max_tokens, KV bytes to max_tokens) per prompt.
        batch: (prompt length, max_tokens) of the model's other decoding requests.
    Returns 0 when fewer than two rows ever share a round."""
    lay = layout(lm)
    done = [r[0] for r in rows]
    ends = [r[1] - 1 for r in rows]  # the last prompt token is fed by the first decode step
    limit = shallow_limit(step)
    worst = 0
    while True:
        live = [i for i in range(len(rows)) if done[i] < ends[i] and done[i] <= limit]
        if len(live) < 2:
            break
        width = max(min(step, ends[i] - done[i]) for i in live)
        keys = max(done[i] for i in live) + width
        held = sum(cache_bytes(lay, done[i], width, False) for i in live)
        held += sum(rows[i][3] for i in range(len(rows)) if i not in live)
        decoding = batch + [(rows[i][1], rows[i][2]) for i in range(len(rows)) if done[i] >= ends[i]]
        held += padded(lm, decoding)[0]
        merged = len(live) * cache_bytes(lay, keys, width, False)
        # the batch's hidden states live from layer to layer (what a first
        # chunk, with little KV, holds beyond its temporaries)
        merged += len(live) * width * lay.hidden * lay.itemsize
        temporaries = len(live) * (chunk_bytes(lay, width, keys) + FIXED)
        worst = max(worst, held + int((merged + temporaries) * MARGIN))
        for i in live:
            done[i] += min(width, ends[i] - done[i])
    return worst


def generate_need(lm, n_prompt: int, max_tokens: int, step: int, cached: int = 0) -> tuple[int, dict]:
    """Bytes a generation adds to the memory in use when it starts: the
    larger of its prefill peak and its decode peak."""
    lay = layout(lm)
    total = n_prompt + max_tokens
    if lm.max_kv_size:
        total_kv = min(total, lm.max_kv_size)
    else:
        total_kv = total
    prefill = 0
    for c, keys in chunks(n_prompt, cached, step):
        prefill = max(prefill, cache_bytes(lay, keys, c, False) + chunk_bytes(lay, c, keys))
    final = cache_bytes(lay, total, 1, True)
    # A plain KV layer grows by concatenation: its old buffer and the grown
    # one are both alive for a moment.
    growth = 0
    if any(layer[0] in ("kv", "quant") for layer in lay.layers):
        growth = int(lay.kv_token_bytes(lay.itemsize) * math.ceil(total_kv / KV_STEP) * KV_STEP)
    logits = 6 * lay.vocab * 4  # logits, log-probs, sampling temporaries (fp32)
    decode = final + growth + logits + chunk_bytes(lay, 1, total)
    parts = {"kv_cache": int(final * MARGIN), "prefill": prefill, "decode": decode, "kv_tokens": total_kv}
    need = max(prefill, decode) + FIXED
    if lm.vision is not None:
        embeds = n_prompt * lay.hidden * lay.itemsize
        parts["embeddings"] = embeds
        need += embeds
    return int(need * MARGIN), parts

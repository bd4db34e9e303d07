"""``cache_save`` / ``cache_load``: prompt caches on disk.

A file is mlx-lm's ``save_prompt_cache`` format (safetensors) with metadata
naming the model (by content: config, vocabulary, a fingerprint of its weight
files) and the exact tokens it holds. Anything that doesn't match is refused
with -32009 before it can touch the store.
Spec: protocol/README.md § `cache_save`, § `cache_load`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import weakref
from pathlib import Path
from typing import Optional

import msgspec

from . import checkpoints
from .. import errors, files, protocol
from ..errors import WorkerError, invalid_params
from ..models.checks import safetensors_header
from .entry import MAX_CHECKPOINTS, Entry
from .layers import DEFAULT_KEEP, cache_nbytes, cache_window, compact, make_cache


log = logging.getLogger("mlx_worker.cache.files")

FORMAT = "mlx-worker-prompt-cache/1"
IDENTITY_KEYS = ("config_sha256", "weights_fingerprint", "tokenizer_sha256")
_SAMPLES = 16  # weight-file windows read for the fingerprint
_SAMPLE_BYTES = 4096
# Per loaded model: what a cache file records of it (model_identity).
_IDENTITIES: "weakref.WeakKeyDictionary[object, dict[str, str]]" = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------- identity


def model_identity(lm) -> dict[str, str]:
    ident = _IDENTITIES.get(lm)
    if ident is None:
        ident = {
            "config_sha256": _sha256(json.dumps(lm.config, sort_keys=True).encode()),
            "weights_fingerprint": _weights_fingerprint(Path(lm.path)),
            "tokenizer_sha256": _sha256(json.dumps(sorted(lm.hf_tokenizer.get_vocab().items())).encode()),
        }
        _IDENTITIES[lm] = ident
    return ident


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _weights_fingerprint(folder: Path) -> str:
    """Names, sizes, safetensors headers and a few evenly spaced windows of
    each weight file: cheap for multi-GB models, and a fine-tune of the same
    architecture changes the sampled bytes."""
    h = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors")) or sorted(p for p in folder.iterdir() if p.is_file())
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            head = f.read(8)
            h.update(head)
            if path.suffix == ".safetensors" and len(head) == 8:
                h.update(f.read(int.from_bytes(head, "little")))
            for i in range(_SAMPLES):
                f.seek(size * i // _SAMPLES)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


# --------------------------------------------------------------------- save


def save(lm, params: protocol.CacheSaveParams, prefill) -> protocol.CacheSaveResult:
    """``prefill(generate_params)`` runs the prompt (what the store lacks) and
    returns (result, the prompt-cache entry that very run left): the file
    holds that entry, under its own key."""
    store = _store_of(lm)
    path = _target(params.path)
    gen = protocol.GenerateParams(
        **{name: getattr(params, name) for name in protocol.PromptParams.__struct_fields__},
        prefill_step_size=params.prefill_step_size,
        max_tokens=0,  # prefill only: whatever the store lacks is computed now
        temperature=0.0,
        seed=0,
    )
    result, entry = prefill(gen)
    if result.stop_reason == "cancelled":
        raise WorkerError(errors.SHUTTING_DOWN, "the worker is shutting down; cache not saved")
    if entry is None:  # the entry is this run's own: its key is the prompt's, as far as it kept
        raise WorkerError(
            errors.OUT_OF_MEMORY,
            "the prompt's cache could not be kept in the store (larger than prompt_cache_bytes "
            f"= {store.max_bytes}, or its rotating window wrapped before a reusable point)",
            {"limit": store.max_bytes, "limit_kind": "prompt_cache"},
        )
    if not all(isinstance(t, (int, str)) for t in entry.key):
        raise invalid_params("params.messages", "this prompt's cache key can't be written to a file")
    from mlx_lm.models.cache import save_prompt_cache

    layers, metadata = file_contents(lm, entry)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    _unlink(tmp)  # never write into whatever sits there (a FIFO would block the writer)
    try:
        save_prompt_cache(str(tmp), layers, metadata)
        os.replace(tmp, path)
    except (OSError, RuntimeError, ValueError) as exc:
        _unlink(tmp)
        raise invalid_params("params.path", f"could not write {path}: {exc}") from None
    return protocol.CacheSaveResult(
        model_id=lm.model_id,
        path=str(path),
        tokens=len(entry.key),
        prompt_tokens=result.usage.prompt_tokens,
        cached_tokens=result.usage.cached_tokens,
        file_bytes=path.stat().st_size,
    )


def _host_path(raw: str) -> Path:
    try:
        return Path(files.check_path(raw))
    except files.PathProblem as exc:
        raise invalid_params("params.path", exc.message) from None


def _target(raw: str) -> Path:
    path = _host_path(raw)
    if path.suffix != ".safetensors":
        raise invalid_params("params.path", "the cache file name must end with .safetensors")
    try:
        is_dir = stat.S_ISDIR(files.stat_of(str(path.parent)).st_mode)
    except files.PathProblem:
        is_dir = False
    if not is_dir:
        raise invalid_params("params.path", f"folder not found: {path.parent}")
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # a name too long, a loop of links
        raise invalid_params("params.path", f"cannot use {path}: {exc}") from None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


# --------------------------------------------------------------------- load


def load(lm, params: protocol.CacheLoadParams) -> protocol.CacheLoadResult:
    failure: Optional[BaseException] = None
    try:
        return _load(lm, params)
    except BaseException as exc:
        failure = exc
    # Out of the except block, and without the traceback: its frames hold
    # the arrays read, whose memory must come back now, not at a cyclic GC.
    failure.__traceback__ = failure.__context__ = failure.__cause__ = None
    import mlx.core as mx

    mx.clear_cache()
    raise failure


def _load(lm, params: protocol.CacheLoadParams) -> protocol.CacheLoadResult:
    store = _store_of(lm)
    path = _host_path(params.path)
    try:
        files.check_regular(str(path))
    except files.PathProblem as exc:
        raise _invalid(path, "file not found" if exc.reason == "not_found" else exc.message) from None
    if path.suffix != ".safetensors":
        raise _invalid(path, "the file name must end with .safetensors")
    # Everything the header says is checked before a byte of data is read.
    header, problem = safetensors_header(path)
    if problem:
        raise _invalid(path, f"not a readable prompt cache file ({problem})")
    meta = header.get("__metadata__")
    meta = {k[2:]: v for k, v in meta.items() if k.startswith("0.")} if isinstance(meta, dict) else {}
    _check_identity(lm, path, meta)
    key = _decode_key(path, meta.get("key"), lm.vocab_size)
    _check_room(store, sum(e["data_offsets"][1] - e["data_offsets"][0] for n, e in header.items()
                           if n != "__metadata__"))
    from mlx_lm.models.cache import load_prompt_cache

    try:
        cache, meta = load_prompt_cache(str(path), return_metadata=True)
    except Exception as exc:  # whatever a damaged file makes the reader raise
        raise _invalid(path, f"not a readable prompt cache file ({type(exc).__name__}: {exc})") from None
    _check_identity(lm, path, meta)
    if _decode_key(path, meta.get("key"), lm.vocab_size) != key:
        raise _invalid(path, "its token list changed while it was read")
    entry = file_entry(lm, path, cache, meta, key, len(key))
    if not store.add(entry):
        raise _too_big(store, entry.nbytes)
    return protocol.CacheLoadResult(model_id=lm.model_id, path=str(path.resolve()), tokens=len(key),
                                    bytes=entry.nbytes)


def _check_identity(lm, path: Path, meta) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _invalid(path, "not a prompt cache written by mlx-worker's cache_save")
    ident = model_identity(lm)
    differs = [k for k in IDENTITY_KEYS if meta.get(k) != ident[k]]
    if differs:
        raise _invalid(
            path,
            f"saved for another model ({meta.get('model_path')}); this is {lm.path}: "
            f"{', '.join(differs)} differ",
        )
    kv_file, kv_model = {k: meta.get(k, "") for k in ("kv_bits", "kv_group_size")}, _kv_meta(lm)
    if kv_file != kv_model:
        raise _invalid(path, f"its KV cache is {_kv_words(kv_file)}; this model was loaded with {_kv_words(kv_model)}")


def _check_room(store, nbytes: int) -> None:
    """The file's data must fit the store's budget and the worker's memory
    before it is read."""
    if nbytes > store.max_bytes:
        raise _too_big(store, nbytes)
    import mlx.core as mx

    from ..memory import refusal, worker_limit

    limit = worker_limit()
    available = limit - mx.get_active_memory()
    if nbytes > available:
        raise refusal("cache_load", nbytes, available, limit, "worker", {})


def _too_big(store, nbytes: int) -> WorkerError:
    return WorkerError(
        errors.OUT_OF_MEMORY,
        f"the cache needs {nbytes} bytes; this model's prompt cache holds at most "
        f"{store.max_bytes} (load the model with a larger prompt_cache_bytes)",
        {"needed": nbytes, "available": store.max_bytes, "limit": store.max_bytes, "limit_kind": "prompt_cache"},
    )


def file_contents(lm, entry: Entry) -> tuple[list, dict]:
    """What a file holds for ``entry`` (cache_save, the disk tier): the
    cache's layers, then its checkpoints' copies, and the metadata that
    names the model, the key and the checkpoints."""
    layers, table = checkpoint_layers(entry)
    metadata = {
        "format": FORMAT,
        "model_path": lm.path,
        **model_identity(lm),
        "key": msgspec.json.encode(entry.key).decode(),
        "n_prompt": str(entry.n_prompt),
        "step": "" if entry.step is None else str(entry.step),
        "keep": str(entry.keep),
        "max_kv_size": "" if not lm.max_kv_size else str(lm.max_kv_size),
        **_kv_meta(lm),
        "checkpoints": table,
        "final": "1" if entry.final else "",
    }
    return compact(entry.cache) + layers, metadata


def file_entry(lm, path: Path, cache: list, meta: dict, key: list, n_prompt: int) -> Entry:
    """The entry a file's layers and metadata describe, checked against the
    model as loaded (-32009 naming the file when they don't fit it)."""
    from mlx_lm.models.cache import can_trim_prompt_cache

    keep = _int_or(meta.get("keep"), DEFAULT_KEEP)
    n_layers = len(make_cache(lm, keep))
    cache, extra = cache[:n_layers], cache[n_layers:]
    try:
        problem = _layout_problem(lm, cache, keep, len(key))
    except Exception as exc:  # state a hostile file shaped so that checking it fails
        problem = f"its cache state can't be read ({type(exc).__name__}: {exc})"
    if problem:
        raise _invalid(path, problem)
    cps = _read_checkpoints(lm, path, meta.get("checkpoints"), cache, extra, keep, len(key))
    import mlx.core as mx

    mx.eval([c.state for c in cache] + [c.state for cp in cps for c in cp.layers if c is not None])
    window = cache_window(cache)
    return Entry(
        key=key,
        n_prompt=min(n_prompt, len(key)),
        cache=cache,
        nbytes=cache_nbytes(cache) + sum(cp.nbytes for cp in cps),
        exact_only=not can_trim_prompt_cache(cache),
        window=window,
        step=_int_or(meta.get("step"), None) if window is not None else None,
        keep=keep,
        checkpoints=cps,
        final=meta.get("final", "1") == "1",
    )


def checkpoint_layers(entry: Entry) -> tuple[list, str]:
    """An entry's checkpoints for a file: their copied layers (appended after
    the cache's own) and, as metadata, each one's position and which of the
    cache's layers those copies stand for."""
    layers, table = [], []
    for cp in entry.checkpoints:
        which = [i for i, c in enumerate(cp.layers) if c is not None]
        layers.extend(cp.layers[i] for i in which)
        table.append([cp.pos, which])
    return layers, msgspec.json.encode(table).decode()


def _read_checkpoints(lm, path: Path, raw, cache: list, extra: list, keep: int, n_tokens: int) -> list:
    """The file's checkpoints, each holding a copy of exactly the layers
    that can't be cut back (a layer left out would resume from the final
    state), checked as the cache's own layers are, at their position."""
    if not raw:
        if extra:
            raise _invalid(path, f"it holds {len(extra)} layers more than this model has")
        return []
    try:
        table = msgspec.json.decode(raw, type=list[tuple[int, list[int]]])
    except msgspec.DecodeError:
        raise _invalid(path, "its checkpoint table is corrupt") from None
    if len(table) > MAX_CHECKPOINTS:
        raise _invalid(path, f"its checkpoint table lists {len(table)} checkpoints; an entry keeps {MAX_CHECKPOINTS}")
    own = checkpoints.leaves(cache)
    copied = [i for i, c in enumerate(own) if checkpoints.needs_checkpoints([c])]
    fresh = iter(extra)
    out = []
    for pos, which in table:
        if not 0 < pos <= n_tokens or which != copied:
            raise _invalid(path, f"its checkpoint at {pos} doesn't fit its {n_tokens} tokens and "
                                 f"the layers {copied} that can't be cut back")
        layers: list = [None] * len(own)
        for i in which:
            layer = next(fresh, None)
            if layer is None or type(layer) is not type(own[i]):
                raise _invalid(path, f"its checkpoint at {pos} doesn't match the cache's layers")
            layers[i] = layer
        cp = checkpoints.Checkpoint(pos, layers, sum(checkpoints.layer_nbytes(c) for c in layers if c is not None))
        try:
            problem = _layout_problem(lm, checkpoints.restore(cache, cp), keep, pos)
        except Exception as exc:  # state a hostile file shaped so that checking it fails
            problem = f"its state can't be read ({type(exc).__name__}: {exc})"
        if problem:
            raise _invalid(path, f"its checkpoint at {pos} doesn't fit this model: {problem}")
        out.append(cp)
    if next(fresh, None) is not None:
        raise _invalid(path, "it holds layers no checkpoint names")
    return out


def _decode_key(path: Path, raw, vocab_size: int) -> list:
    try:
        key = msgspec.json.decode(raw or "", type=list)
    except msgspec.DecodeError:
        raise _invalid(path, "its token list is missing or corrupt") from None
    for t in key:
        if isinstance(t, bool) or not isinstance(t, (int, str)) or (isinstance(t, int) and not 0 <= t < vocab_size):
            raise _invalid(path, f"its token list holds {t!r}, not a token of this model")
    if not key:
        raise _invalid(path, "it holds no tokens")
    return key


def _layout_problem(lm, cache: list, keep: int, n_tokens: int) -> Optional[str]:
    fresh = make_cache(lm, keep)
    want = [_describe(c) for c in fresh]
    got = [_describe(c) for c in cache]
    if want != got:
        return (f"its cache layout doesn't match this model as loaded (file: {got[:2]}..., "
                f"model: {want[:2]}...; was max_kv_size different?)")
    for i, c in enumerate(_flat(cache)):
        offset = getattr(c, "offset", None)
        if not isinstance(offset, int):
            continue
        if offset != n_tokens:
            return f"its layer {i} has seen {offset} positions; its token list holds {n_tokens} tokens"
        keys = getattr(c, "keys", None)
        held = 0 if keys is None else (keys[0] if isinstance(keys, (tuple, list)) else keys).shape[-2]
        size = getattr(c, "max_size", None)
        want = min(offset, size) if isinstance(size, int) else offset
        if held < want or getattr(c, "_idx", 0) > held:
            return f"its layer {i} says {offset} positions but holds {held}"
    return _shape_problem(lm, cache, keep)


def _flat(cache: list) -> list:
    out = []
    for c in cache:
        out.extend(_flat(list(c.caches)) if hasattr(c, "caches") else [c])
    return out


def _shape_problem(lm, cache: list, keep: int) -> Optional[str]:
    """Every layer's arrays shaped as the model as loaded makes them (every
    axis but the sequence one, and the dtype), known from a one-token pass
    that is built but never computed (MLX is lazy)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if lm.vision is not None:  # its language model needs a prompt's positions; the types were checked
        return None
    probe = make_cache(lm, keep)
    try:
        lm.model(mx.array([[0]], dtype=mx.uint32), cache=probe)
    except Exception:  # a model this probe can't drive: the layout check above stands
        log.debug("cache_load: no shape probe for this model", exc_info=True)
        return None
    for i, (want, got) in enumerate(zip(_flat(probe), _flat(cache))):
        wa = [v for _, v in tree_flatten(want.state) if isinstance(v, mx.array)]
        ga = [v for _, v in tree_flatten(got.state) if isinstance(v, mx.array)]
        if len(wa) != len(ga):
            return f"its layer {i} holds {len(ga)} arrays; this model's holds {len(wa)}"
        for a, b in zip(wa, ga):
            if a.ndim != b.ndim or a.dtype != b.dtype or a.ndim < 2 or (
                a.shape[:-2] + a.shape[-1:] != b.shape[:-2] + b.shape[-1:]
            ):
                return (f"its layer {i} holds an array of shape {tuple(b.shape)} ({b.dtype}); this model "
                        f"makes {tuple(a.shape)} ({a.dtype}) (positions on axis -2)")
    return None


def _describe(c) -> str:
    size = getattr(c, "max_size", None)
    if size is not None and hasattr(c, "keep"):  # RotatingKVCache: the first tokens it never evicts too
        size = f"{size}, keep {c.keep}"
    if size is None and hasattr(c, "bits"):  # QuantizedKVCache
        size = f"{c.bits} bits, group {c.group_size}"
    return type(c).__name__ + (f"({size})" if size is not None else "")


def _kv_meta(lm) -> dict[str, str]:
    """What a file records of the KV quantization ("" for none)."""
    q = lm.kv_quant
    return {"kv_bits": "" if q is None else str(q.bits), "kv_group_size": "" if q is None else str(q.group_size)}


def _kv_words(meta: dict) -> str:
    if not meta["kv_bits"]:
        return "not quantized (no kv_bits)"
    return f"quantized (kv_bits {meta['kv_bits']}, kv_group_size {meta['kv_group_size']})"


def _int_or(raw, default):
    try:
        return int(raw)
    except (TypeError, ValueError):
        return default


def _invalid(path: Path, why: str) -> WorkerError:
    return WorkerError(errors.CACHE_FILE_INVALID, f"prompt cache file {path}: {why}", {"path": str(path)})


def _store_of(lm):
    if lm.prompt_cache is None:
        raise invalid_params(
            "params.model_id",
            f"model {lm.model_id!r} was loaded with the prompt cache disabled "
            "(prompt_cache_bytes or prompt_cache_entries 0)",
        )
    return lm.prompt_cache

"""``load {parallel}``: a text model sharded over this worker's ranks
(protocol/README.md, "Distributed models"); imported only by such a load."""

from __future__ import annotations

import logging
import queue
from pathlib import Path

from .. import errors, protocol
from ..errors import WorkerError
from ..models.config import text_config
from ..models.fixups import finish_tokenizer
from ..models.loaded import Parallel
from ..models.loader import Loaded, model_id_of
from ..models.loading import LoadProgress
from . import ring as rings
from .mirror import DistributedModel

log = logging.getLogger("mlx_worker.distributed")

LOAD_TIMEOUT_S = 600.0


def check(path: Path, params: protocol.LoadParams, config: dict) -> None:
    """What a distributed load can't do, refused before any process starts
    (a failed sharded load would end the worker's one group)."""
    parallel = params.parallel
    if "vision_config" in config:
        raise errors.invalid_params("params.parallel", "distributed loads are for text models only")
    if params.max_kv_size is not None:
        raise errors.invalid_params("params.max_kv_size", "a rotating KV cache is not supported on a distributed model")
    if getattr(params, "kv_bits", None) is not None:
        raise errors.invalid_params("params.kv_bits", "a quantized KV cache is not supported on a distributed model")
    size = len(parallel.hosts) if parallel.hosts else parallel.ranks
    where = "params.parallel.hosts" if parallel.hosts else "params.parallel.ranks"
    cfg = text_config(config)
    if parallel.mode == "tensor":
        for key in ("num_attention_heads", "num_key_value_heads"):
            value = cfg.get(key)
            if isinstance(value, int) and value % size:
                raise errors.invalid_params(where, f"tensor parallel splits attention heads: {key} ({value}) "
                                                   f"does not divide by {size} ranks")
    else:
        if not (path / "model.safetensors.index.json").is_file():
            raise errors.invalid_params("params.parallel.mode", "pipeline parallel reads model.safetensors.index.json "
                                                                "to give each rank its layers; the folder has none")
        layers = cfg.get("num_hidden_layers")
        if isinstance(layers, int) and layers < size:
            raise errors.invalid_params(where, f"the model has {layers} layers, fewer than {size} ranks")
    from mlx_lm.utils import load_model

    try:
        model, _ = load_model(path, lazy=True, strict=False, trust_remote_code=params.trust_remote_code)
    except Exception as exc:
        raise WorkerError(errors.LOAD_FAILED, f"could not load {path}: {type(exc).__name__}: {exc}",
                          {"path": str(path)}) from None
    supported = hasattr(model, "shard") if parallel.mode == "tensor" else hasattr(getattr(model, "model", None), "pipeline")
    if not supported:
        raise errors.invalid_params("params.parallel.mode", f"mlx-lm's {config.get('model_type')!r} model has no "
                                                            f"{parallel.mode} parallel sharding")


def load(path: Path, config: dict, params: protocol.LoadParams, progress: LoadProgress) -> Loaded:
    try:
        return _load(path, config, params, model_id_of(params, path))
    except rings.RingFailed as exc:  # a load error, with the group's reason
        raise WorkerError(errors.LOAD_FAILED, f"could not load {path}: {exc.message}",
                          {"path": str(path), "field": "params.parallel", **(exc.data or {})}) from None


def _load(path: Path, config: dict, params: protocol.LoadParams, model_id: str) -> Loaded:
    from mlx_lm.utils import sharded_load

    parallel = params.parallel
    size = len(parallel.hosts) if parallel.hosts else parallel.ranks
    ring = rings.ensure(size, list(parallel.hosts or []), parallel.backend, parallel.timeout_s)
    group = ring.group
    op = {"op": "load", "model": model_id, "path": str(path), "mode": parallel.mode,
          "trust_remote_code": params.trust_remote_code}
    ring.send(op)
    pipeline = parallel.mode == "pipeline"
    try:
        model, tokenizer = sharded_load(str(path), pipeline_group=group if pipeline else None,
                                        tensor_group=None if pipeline else group,
                                        tokenizer_config={"trust_remote_code": params.trust_remote_code},
                                        trust_remote_code=params.trust_remote_code)
    except RuntimeError as exc:
        raise ring.lost(exc) from None
    except Exception as exc:  # the followers fail the same way and exit: the group is gone
        ring.fail(f"rank 0 could not load the model: {type(exc).__name__}: {exc}")
        raise WorkerError(errors.LOAD_FAILED, f"could not load {path} {parallel.mode}-parallel: "
                          f"{type(exc).__name__}: {exc}", {"path": str(path), "field": "params.parallel"}) from None
    replies = _replies(ring)
    finish_tokenizer(tokenizer, params.chat_template)
    wrapped = DistributedModel(ring, model_id, model, len(model.layers))
    status = protocol.ParallelStatus(
        mode=parallel.mode, backend=ring.backend, ranks=ring.size, pids=ring.describe()["pids"],
        layers=[len(model.layers)] + [r.get("layers", 0) for r in replies])
    return Loaded("text", wrapped, tokenizer, parallel=Parallel(status, lambda: ring.failure, wrapped.release))


def _replies(ring) -> list[dict]:
    """Each follower's load reply (sent after its sharded_load returned: by
    then rank 0's own load, which ends in a collective with them, is done)."""
    replies = []
    for f in ring.followers:
        try:
            reply = f.replies.get(timeout=LOAD_TIMEOUT_S)
        except queue.Empty:
            reply = {"error": f"no reply within {LOAD_TIMEOUT_S:.0f} s"}
        if reply is None or not reply.get("ok"):
            raise ring.fail(f"rank {f.rank} could not load the model: {reply and reply.get('error')}")
        replies.append(reply)
    return replies

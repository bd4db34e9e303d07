"""Loaded models: loading from local folders, lookup by id, unloading."""

from __future__ import annotations

import gc
import logging
import os
import stat
import time
from pathlib import Path
from typing import Optional

from ..cache import disk as cache_disk, store as prompt_cache
from .. import embeddings, errors, files, protocol
from ..engine import speculative
from .. import memory as memory_budget
from ..errors import WorkerError
from ..cache.kv_quant import check_model as check_kv_layers, from_load as kv_quant_of_load
from .loaded import LoadedModel, kv_fields, new_loaded_model
from .loading import LoadProgress, evaluate_weights
from .checks import check_folder, loads, template_problem
from ..vision import load_vision_model

log = logging.getLogger("mlx_worker.models.registry")

def read_config(path: Path) -> dict:
    config_path = path / "config.json"
    try:
        files.check_regular(str(config_path))
    except files.PathProblem as exc:
        why = f"config.json not found in {path}" if exc.reason == "not_found" else f"config.json: {exc.message}"
        raise WorkerError(errors.LOAD_FAILED, why, {"path": str(path)}) from None
    try:
        config = loads(config_path.read_text(encoding="utf-8"), "config.json")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise WorkerError(errors.LOAD_FAILED, f"config.json is not valid JSON: {exc}",
                          {"path": str(path), "file": str(config_path)}) from None
    if not isinstance(config, dict):
        raise WorkerError(errors.LOAD_FAILED, "config.json is not a JSON object", {"path": str(path)})
    return config


class ModelRegistry:
    """The models this worker holds. Touched only by the compute thread,
    except ``snapshot`` (read by ``status`` on the reader thread)."""

    def __init__(self) -> None:
        self._models: dict[str, LoadedModel] = {}

    def snapshot(self) -> list[LoadedModel]:
        # A distributed model whose group failed is gone for the host at once
        # (the compute thread unloads it between steps).
        # A copy first: load/unload change the dict on the compute thread.
        return [m for m in list(self._models.values()) if "parallel" not in m.extra or m.model._ring.failure is None]

    def get(self, model_id: Optional[str]) -> LoadedModel:
        if model_id is None:
            if len(self._models) == 1:
                return next(iter(self._models.values()))
            detail = "no model is loaded" if not self._models else "several models are loaded; say which"
            raise WorkerError(
                errors.MODEL_NOT_LOADED,
                f"model_id omitted and {detail}",
                {"field": "params.model_id", "loaded": list(self._models)},
            )
        try:
            return self._models[model_id]
        except KeyError:
            raise WorkerError(
                errors.MODEL_NOT_LOADED,
                f"model {model_id!r} is not loaded",
                {"field": "params.model_id", "loaded": list(self._models)},
            ) from None

    def load(self, params: protocol.LoadParams, progress: Optional[LoadProgress] = None) -> protocol.LoadResult:
        """Load a model folder. ``progress`` gets load_progress events and says
        when to stop (between groups of weights); a stopped load raises
        LoadCancelled and leaves nothing loaded."""
        progress = progress or LoadProgress(request_id=0)
        progress.report("checks", 0, 1)
        path = _model_folder(params.model).resolve()
        model_id = params.model_id or path.name
        existing = self._models.get(model_id)
        if existing is not None:
            if existing.path == str(path):
                _check_same_options(existing, params)
                progress.report("checks", 1, 1)
                return _load_result(existing, 0.0, already_loaded=True)
            raise WorkerError(
                errors.INVALID_PARAMS,
                f"model_id {model_id!r} is already used by {existing.path}; unload it or pick another model_id",
                {"field": "params.model_id"},
            )

        if params.chat_template is not None:
            problem = template_problem(params.chat_template)
            if problem:
                raise errors.invalid_params("params.chat_template", f"the chat template does not parse: {problem}")
        if params.parallel is not None and params.draft_model_id is not None:  # before any rank starts
            raise errors.invalid_params("params.draft_model_id",
                                        "speculative decoding is not supported on a distributed (parallel) model")
        draft = None
        if params.draft_model_id is not None:  # loaded first, like any model
            draft = speculative.find(self.get, params.draft_model_id, "params.draft_model_id")
        config = read_config(path)
        check_folder(path, config, params.trust_remote_code)
        as_embedding = _embedding_load(path, config, params)
        kv_quant = kv_quant_of_load(params, config)
        if params.parallel is not None:
            _check_parallel(path, params, config)
        memory_budget.admit_load(path, params.memory_limit)
        disk = _disk_tier(params)
        progress.report("checks", 1, 1)
        start = time.perf_counter()
        import mlx.core as mx

        before = mx.get_active_memory()
        loaded = None
        try:
            if params.parallel is not None:
                from ..distributed import load as distributed  # late: only distributed loads start ranks

                loaded = distributed.load(path, config, params, model_id)
            elif as_embedding:
                loaded = embeddings.load(path, config, params, progress)
            elif "vision_config" in config:
                loaded = load_vision_model(path, config, params, progress, kv_quant is not None)
            else:
                loaded = _load_text_model(path, config, params, progress, kv_quant is not None)
            _check_folder_template(loaded, path)
            _settle_random_state()
            memory = max(0, mx.get_active_memory() - before)
            failure = None
        except WorkerError as exc:
            failure = exc
        except Exception as exc:  # any failure inside a library is a load failure
            failure = _load_failure(path, config, exc)
        if failure is not None:
            # Out of the except block, and without the traceback: its frames
            # hold the half-built model, whose memory must really come back.
            _release_shards(loaded)
            loaded = None
            failure.__traceback__ = failure.__context__ = failure.__cause__ = None
            _release()
            raise failure

        loaded.model_id = model_id
        loaded.load_options = _load_options(params)
        loaded.memory_bytes = memory
        loaded.memory_limit = params.memory_limit
        if params.prefill_step_size:
            loaded.prefill_step_size = params.prefill_step_size
        loaded.max_kv_size = params.max_kv_size
        loaded.kv_quant = kv_quant
        if draft is not None:
            try:
                speculative.check_pair(loaded, draft, "params.draft_model_id")
            except WorkerError as exc:
                failure = exc
            else:
                failure = None
            if failure is not None:  # as above: nothing of the model stays
                _release_shards(loaded)
                loaded = draft = None
                failure.__traceback__ = failure.__context__ = failure.__cause__ = None
                _release()
                raise failure
        loaded.prompt_cache = prompt_cache.create_store(loaded, params) if loaded.kind != "embedding" else None
        cache_disk.attach(loaded, loaded.prompt_cache, disk)
        self._models[model_id] = loaded
        elapsed = (time.perf_counter() - start) * 1000
        log.info("loaded %s (%s) in %.0f ms", model_id, loaded.kind, elapsed)
        return _load_result(loaded, elapsed)

    def failed_distributed(self) -> list[str]:
        """Distributed models whose group failed: to be unloaded."""
        return [mid for mid, m in self._models.items()
                if "parallel" in m.extra and m.model._ring.failure is not None]

    def unload(self, model_id: Optional[str]) -> protocol.UnloadResult:
        model = self.get(model_id)
        unloaded_id = model.model_id
        del self._models[unloaded_id]
        if model.prompt_cache is not None:
            cache_disk.spill_all(model, [model.prompt_cache, *speculative.pair_stores(model)])
            model.prompt_cache.clear()
        speculative.forget(model, self._models.values())
        if "parallel" in model.extra:
            from ..distributed.load import release

            release(model)
        del model
        _release()
        return protocol.UnloadResult(model_id=unloaded_id, unloaded=True)


def _disk_tier(params: protocol.LoadParams):
    try:
        return cache_disk.tier_for(params.cache_dir, params.cache_dir_bytes)
    except OSError as exc:
        raise errors.invalid_params("params.cache_dir", f"cannot use it as the prompt cache's folder: {exc}") from None


def _release_shards(loaded: Optional[LoadedModel]) -> None:
    """A distributed load refused after its shards loaded: the followers drop them too."""
    if loaded is not None and "parallel" in loaded.extra:
        from ..distributed import load as distributed

        try:
            distributed.release(loaded)
        except Exception:  # the refusal goes out regardless
            log.exception("could not release a refused load's shards")


def _embedding_load(path: Path, config: dict, params: protocol.LoadParams) -> bool:
    """Whether the folder loads as an embedding model (``load {embedding}``,
    else detected); the options that only generation uses are refused."""
    detected = embeddings.is_embedding_folder(path, config)
    wanted = detected if params.embedding is None else params.embedding
    if not wanted:
        if str(config.get("model_type", "")).lower() in embeddings.ENCODERS:
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


def _check_parallel(path: Path, params: protocol.LoadParams, config: dict) -> None:
    parallel = params.parallel
    if (parallel.ranks is None) == (parallel.hosts is None):
        raise errors.invalid_params("params.parallel", "give either ranks (processes on this machine) or hosts")
    from ..distributed.load import check

    check(path, params, config)


def _load_options(params: protocol.LoadParams) -> dict:
    """Every load option as sent (what identifies the folder is not an option)."""
    return {name: getattr(params, name) for name in params.__struct_fields__ if name not in ("model", "model_id")}


def _check_same_options(existing: LoadedModel, params: protocol.LoadParams) -> None:
    """A repeated load gets the loaded model only if it asks for the same
    thing: options are compared as sent, never silently dropped."""
    requested = _load_options(params)
    differing = [name for name, value in requested.items() if existing.load_options.get(name) != value]
    if differing:
        raise WorkerError(
            errors.INVALID_PARAMS,
            f"model_id {existing.model_id!r} is already loaded from this folder with other "
            f"{', '.join(differing)}; unload it first to load it with these options, or use another model_id",
            {"field": f"params.{differing[0]}", "options": differing},
        )


def _check_folder_template(loaded: "LoadedModel", path: Path) -> None:
    owners = [loaded.hf_tokenizer, getattr(loaded.vision, "processor", None)]
    for owner in owners:
        problem = template_problem(getattr(owner, "chat_template", None))
        if problem:
            raise WorkerError(
                errors.LOAD_FAILED,
                f"the model folder's chat template does not parse: {problem} "
                "(pass a working `chat_template` to load to replace it)",
                {"path": str(path), "field": "params.chat_template"},
            )


def _model_folder(raw: str) -> Path:
    """The folder a load names, by the one path rule (files.py)."""
    try:
        st = files.stat_of(files.check_path(raw))
    except files.PathProblem as exc:
        if exc.reason in ("relative_path", "invalid_path"):
            raise errors.invalid_params("params.model", exc.message) from None
        raise WorkerError(
            errors.MODEL_PATH_NOT_FOUND,
            f"model path not found: {raw} (models are loaded from local folders only)"
            if exc.reason == "not_found" else f"model path unusable: {exc.message}",
            {"field": "params.model", "path": raw},
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise WorkerError(
            errors.MODEL_PATH_NOT_FOUND,
            f"model path is not a folder: {raw}",
            {"field": "params.model", "path": raw},
        )
    return Path(raw)


def _load_failure(path: Path, config: dict, exc: BaseException) -> WorkerError:
    message = str(exc) or type(exc).__name__
    if isinstance(exc, MemoryError) or ("memory" in message.lower() and "alloc" in message.lower()):
        return WorkerError(errors.OUT_OF_MEMORY, f"out of memory while loading: {message}")
    log.debug("load failed", exc_info=exc)
    if "not supported" in message and isinstance(config.get("auto_map"), dict):
        message += (
            " (config.json maps the architecture to custom PyTorch code in auto_map; "
            "MLX cannot run that code, with or without trust_remote_code)"
        )
    return WorkerError(
        errors.LOAD_FAILED,
        f"could not load {path}: {type(exc).__name__}: {message}",
        {"path": str(path)},
    )


def _load_result(m: LoadedModel, elapsed_ms: float, already_loaded: bool = False) -> protocol.LoadResult:
    return protocol.LoadResult(
        model_id=m.model_id,
        kind=m.kind,
        context_length=m.context_length,
        vocab_size=m.vocab_size,
        path=m.path,
        eos_token_ids=m.eos_token_ids,
        has_chat_template=bool(getattr(m.hf_tokenizer, "chat_template", None)),
        memory_bytes=m.memory_bytes,
        load_ms=round(elapsed_ms, 2),
        already_loaded=already_loaded,
        parallel=m.extra.get("parallel"),
        embedding_dimensions=m.extra.get("dimensions"),
        pooling=m.extra.get("pooling"),
        **kv_fields(m),
        **(_channel_info(m.tokenizer) if m.kind != "embedding" else {}),
    )


def _channel_info(tokenizer) -> dict:
    """The model family's tool-call format and reasoning markers, as mlx-lm's
    TokenizerWrapper detected them."""
    from ..tools import formats  # late: it imports MLX

    out: dict = {}
    fmt = formats.format_of(tokenizer)
    if fmt is not None:
        out["tool_call_format"] = fmt.name
        out["tool_grammar"] = True
    names = formats.template_names(getattr(tokenizer, "_tokenizer", tokenizer))
    if names:
        out["chat_template_names"] = names
    if getattr(tokenizer, "has_thinking", False):
        out["reasoning_markers"] = [tokenizer.think_start, tokenizer.think_end]
    return out


def _release() -> None:
    import mlx.core as mx

    _settle_random_state()
    gc.collect()
    mx.clear_cache()


def _settle_random_state() -> None:
    """Building a model draws its (soon replaced) random init from MLX's
    global PRNG key lazily; until the key is evaluated, the whole chain of
    splits behind it stays in memory (~60 KB per load, measured)."""
    import mlx.core as mx

    mx.eval(mx.random.state)


def _load_text_model(
    path: Path, config: dict, params: protocol.LoadParams, progress: LoadProgress, kv_quantized: bool
) -> LoadedModel:
    from mlx_lm import load as mlx_lm_load

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer_config: dict = {"trust_remote_code": params.trust_remote_code}
    # Lazy: the model is built over unread weights, read below group by group.
    model, tokenizer = progress.step("tokenizer", lambda: mlx_lm_load(
        str(path), tokenizer_config=tokenizer_config, trust_remote_code=params.trust_remote_code, lazy=True
    ))
    if kv_quantized:  # before any weight is read
        check_kv_layers(model)
    evaluate_weights(model, progress)
    if params.chat_template is not None:
        tokenizer._tokenizer.chat_template = params.chat_template
    from ..tools.markers import extend_thinking
    from ..tools.formats import install

    install(tokenizer)
    extend_thinking(tokenizer)
    return new_loaded_model(path, "text", model, tokenizer, config)



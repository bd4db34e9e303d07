"""The models a worker holds: loading from local folders (protocol/README.md,
"load"), lookup by id, unloading. It knows no model family: the loaders it is
handed do (models/loader.py)."""

from __future__ import annotations

import gc
import logging
import stat
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence

from ..cache import disk as cache_disk, store as prompt_cache
from .. import errors, files, protocol
from .. import memory as memory_budget
from ..errors import WorkerError
from ..cache.kv_quant import from_load as kv_quant_of_load
from .checks import check_folder, loads, template_problem
from .config import context_length_of, vocab_size_of
from .loaded import DEFAULT_PREFILL_STEP, LoadedModel, kv_fields
from .loader import Loaded, Loader, model_id_of
from .loading import LoadProgress

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


class LoadHooks(Protocol):
    """What a feature above keeps per loaded model (speculative decoding's
    draft pairing): checks around a load, stores of its own, and what goes
    when a model is unloaded."""

    def before_load(self, get: Callable[[str], LoadedModel], params: protocol.LoadParams) -> None: ...
    def after_load(self, get: Callable[[str], LoadedModel], params: protocol.LoadParams, lm: LoadedModel) -> None: ...
    def stores(self, lm: LoadedModel) -> list: ...
    def forget(self, gone: LoadedModel, others: Iterable[LoadedModel]) -> None: ...


class ModelRegistry:
    """The models this worker holds. Touched only by the compute thread,
    except ``snapshot`` and ``describe`` (read by ``status`` on the reader thread).
    ``loaders``: the first that claims a folder loads it (models/loader.py)."""

    def __init__(self, loaders: Mapping[str, Loader], hooks: Sequence[LoadHooks] = ()) -> None:
        self._models: dict[str, LoadedModel] = {}
        self._loaders = dict(loaders)
        self._hooks = list(hooks)

    def snapshot(self) -> list[LoadedModel]:
        # A distributed model whose group failed is gone for the host at once
        # (the compute thread unloads it between steps).
        # A copy first: load/unload change the dict on the compute thread.
        return [m for m in list(self._models.values()) if not m.failed]

    def describe(self, lm: LoadedModel) -> protocol.ModelStatus:
        return lm.describe(self._hook_stores(lm))

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
        model_id = model_id_of(params, path)
        existing = self._models.get(model_id)
        if existing is not None:
            if existing.path != str(path):
                raise WorkerError(
                    errors.INVALID_PARAMS,
                    f"model_id {model_id!r} is already used by {existing.path}; unload it or pick another model_id",
                    {"field": "params.model_id"},
                )
            _check_same_options(existing, params)
            progress.report("checks", 1, 1)
            return _load_result(existing, 0.0, already_loaded=True)
        loader, config, kv_quant, disk = self._check(path, params)
        progress.report("checks", 1, 1)
        start = time.perf_counter()
        loaded = self._build(loader, path, config, params, progress, kv_quant, model_id)
        loaded.prompt_cache = prompt_cache.create_store(loaded, params) if loaded.kind != "embedding" else None
        cache_disk.attach(loaded, loaded.prompt_cache, disk)
        self._models[model_id] = loaded
        elapsed = (time.perf_counter() - start) * 1000
        log.info("loaded %s (%s) in %.0f ms", model_id, loaded.kind, elapsed)
        return _load_result(loaded, elapsed)

    def _check(self, path: Path, params: protocol.LoadParams) -> tuple[Loader, dict, Any, Any]:
        """Everything refused before any weight is read: the loader that
        claims the folder, its config, the KV quantization, the disk tier."""
        if params.chat_template is not None:
            problem = template_problem(params.chat_template)
            if problem:
                raise errors.invalid_params("params.chat_template", f"the chat template does not parse: {problem}")
        for hook in self._hooks:
            hook.before_load(self.get, params)
        config = read_config(path)
        check_folder(path, config, params.trust_remote_code)
        loader = next(lo for lo in self._loaders.values() if lo.claims(path, config, params))
        kv_quant = kv_quant_of_load(params, config)
        loader.check(path, config, params)
        memory_budget.admit_load(path, params.memory_limit)
        return loader, config, kv_quant, _disk_tier(params)

    def _build(self, loader: Loader, path: Path, config: dict, params: protocol.LoadParams,
               progress: LoadProgress, kv_quant, model_id: str) -> LoadedModel:
        """The loaded model, complete; on any failure nothing of it stays."""
        import mlx.core as mx

        before = mx.get_active_memory()
        parts = None
        try:
            parts = loader.load(path, config, params, progress)
            _check_templates(parts, path)
            _settle_random_state()
            memory = max(0, mx.get_active_memory() - before)
            loaded = _loaded_model(parts, model_id, path, config, params, kv_quant, memory)
            for hook in self._hooks:
                hook.after_load(self.get, params, loaded)
            return loaded
        except WorkerError as exc:
            failure = exc
        except Exception as exc:  # any failure inside a library is a load failure
            failure = _load_failure(path, config, exc)
        # Out of the except block, and without the traceback: its frames
        # hold the half-built model, whose memory must really come back.
        _release_parts(parts)
        parts = loaded = None
        failure.__traceback__ = failure.__context__ = failure.__cause__ = None
        _release()
        raise failure

    def failed(self) -> list[str]:
        """Distributed models whose group failed: to be unloaded."""
        return [mid for mid, m in self._models.items() if m.failed]

    def unload(self, model_id: Optional[str]) -> protocol.UnloadResult:
        model = self.get(model_id)
        unloaded_id = model.model_id
        del self._models[unloaded_id]
        if model.prompt_cache is not None:
            cache_disk.spill_all(model, [model.prompt_cache, *self._hook_stores(model)])
            model.prompt_cache.clear()
        for hook in self._hooks:
            hook.forget(model, self._models.values())
        if model.parallel is not None:
            model.parallel.release()
        del model
        _release()
        return protocol.UnloadResult(model_id=unloaded_id, unloaded=True)

    def _hook_stores(self, lm: LoadedModel) -> list:
        return [store for hook in self._hooks for store in hook.stores(lm)]


def _disk_tier(params: protocol.LoadParams):
    try:
        return cache_disk.tier_for(params.cache_dir, params.cache_dir_bytes)
    except OSError as exc:
        raise errors.invalid_params("params.cache_dir", f"cannot use it as the prompt cache's folder: {exc}") from None


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


def _release_parts(parts: Optional[Loaded]) -> None:
    """A load refused after its model was built: what outlives the arrays goes too."""
    if parts is not None:
        try:
            parts.release()
        except Exception:  # the refusal goes out regardless
            log.exception("could not release a refused load's shards")


def _loaded_model(parts: Loaded, model_id: str, path: Path, config: dict, params: protocol.LoadParams,
                  kv_quant, memory: int) -> LoadedModel:
    return LoadedModel(
        model_id=model_id, path=str(path), kind=parts.kind, model=parts.model, tokenizer=parts.tokenizer,
        config=config, context_length=context_length_of(config), vocab_size=vocab_size_of(config, parts.tokenizer),
        eos_token_ids=sorted(parts.tokenizer.eos_token_ids), memory_bytes=memory, load_options=_load_options(params),
        memory_limit=params.memory_limit, prefill_step_size=params.prefill_step_size or DEFAULT_PREFILL_STEP,
        max_kv_size=params.max_kv_size, kv_quant=kv_quant, vision=parts.vision, parallel=parts.parallel,
        pooling=parts.pooling, dimensions=parts.dimensions,
    )


def _check_templates(parts: Loaded, path: Path) -> None:
    for template in parts.chat_templates():
        problem = template_problem(template)
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
    """Without the tool-call fields: the methods layer adds what the tools part says of the tokenizer."""
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
        parallel=m.parallel.status if m.parallel is not None else None,
        embedding_dimensions=m.dimensions,
        pooling=m.pooling,
        **kv_fields(m),
    )


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

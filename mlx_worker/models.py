"""Loaded models: loading from local folders, lookup by id, unloading."""

from __future__ import annotations

import gc
import json
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import errors, files, protocol
from .errors import WorkerError
from .kv_quant import check_layers, from_load as kv_quant_of_load
from .loading import LoadProgress, evaluate_weights
from .model_checks import check_folder, template_problem, text_config

log = logging.getLogger("mlx_worker.models")

DEFAULT_PREFILL_STEP = 512


@dataclass
class LoadedModel:
    model_id: str
    path: str
    kind: str  # "text" | "vision"
    model: Any  # the nn.Module that generate_step drives
    tokenizer: Any  # mlx_lm TokenizerWrapper
    config: dict
    context_length: Optional[int]
    vocab_size: int
    eos_token_ids: list[int]
    memory_bytes: int
    prefill_step_size: int = DEFAULT_PREFILL_STEP
    max_kv_size: Optional[int] = None
    kv_quant: Any = None  # kv_quant.KVQuant with load's kv_bits, else None
    prompt_cache: Any = None  # a prompt cache store, when enabled
    vision: Any = None  # the vision adapter, for kind == "vision"
    memory_limit: Optional[int] = None  # load's memory_limit: weights + any one request
    load_options: dict = field(default_factory=dict)  # load's options as sent
    extra: dict = field(default_factory=dict)

    @property
    def hf_tokenizer(self):
        # The Hugging Face tokenizer itself: its apply_chat_template keeps the
        # template's own defaults (mlx-lm's wrapper injects options).
        return getattr(self.tokenizer, "_tokenizer", self.tokenizer)

    def decode(self, tokens: list[int]) -> str:
        """Token ids -> text, the one way both generated text and detokenize
        use: special tokens kept, no clean-up of spaces (it would change the
        text, e.g. " ," -> ",", so the continuation would no longer be exact)."""
        return self.tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def describe(self) -> protocol.ModelStatus:
        cache = self.prompt_cache.status() if self.prompt_cache is not None else None
        return protocol.ModelStatus(
            model_id=self.model_id,
            kind=self.kind,
            path=self.path,
            context_length=self.context_length,
            vocab_size=self.vocab_size,
            memory_bytes=self.memory_bytes,
            prompt_cache=cache,
            memory_limit=self.memory_limit,
            **_kv_fields(self),
        )


def context_length_of(config: dict) -> Optional[int]:
    for cfg in (text_config(config), config):
        for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length", "n_ctx"):
            value = cfg.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def read_config(path: Path) -> dict:
    config_path = path / "config.json"
    try:
        files.check_regular(str(config_path))
    except files.PathProblem as exc:
        why = f"config.json not found in {path}" if exc.reason == "not_found" else f"config.json: {exc.message}"
        raise WorkerError(errors.LOAD_FAILED, why, {"path": str(path)}) from None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WorkerError(errors.LOAD_FAILED, f"config.json is not valid JSON: {exc}", {"path": str(path)})
    if not isinstance(config, dict):
        raise WorkerError(errors.LOAD_FAILED, "config.json is not a JSON object", {"path": str(path)})
    return config


class ModelRegistry:
    """The models this worker holds. Touched only by the compute thread,
    except ``snapshot`` (read by ``status`` on the reader thread)."""

    def __init__(self) -> None:
        self._models: dict[str, LoadedModel] = {}

    def snapshot(self) -> list[LoadedModel]:
        return list(self._models.values())

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
        config = read_config(path)
        check_folder(path, config, params.trust_remote_code)
        kv_quant = kv_quant_of_load(params, config)
        from . import memory as memory_budget

        memory_budget.admit_load(path, params.memory_limit)
        progress.report("checks", 1, 1)
        start = time.perf_counter()
        import mlx.core as mx

        before = mx.get_active_memory()
        try:
            if "vision_config" in config:
                from .vision import load_vision_model

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
        from . import prompt_cache

        loaded.prompt_cache = prompt_cache.create_store(loaded, params)
        self._models[model_id] = loaded
        elapsed = (time.perf_counter() - start) * 1000
        log.info("loaded %s (%s) in %.0f ms", model_id, loaded.kind, elapsed)
        return _load_result(loaded, elapsed)

    def unload(self, model_id: Optional[str]) -> protocol.UnloadResult:
        model = self.get(model_id)
        unloaded_id = model.model_id
        del self._models[unloaded_id]
        if model.prompt_cache is not None:
            model.prompt_cache.clear()
        del model
        _release()
        return protocol.UnloadResult(model_id=unloaded_id, unloaded=True)


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
        **_kv_fields(m),
        **_channel_info(m.tokenizer),
    )


def _kv_fields(m: LoadedModel) -> dict:
    q = m.kv_quant
    return {} if q is None else {"kv_bits": q.bits, "kv_group_size": q.group_size}


def _channel_info(tokenizer) -> dict:
    """The model family's tool-call format and reasoning markers, as mlx-lm's
    TokenizerWrapper detected them."""
    from .tool_grammar import family_of, syntax_for  # late: it imports MLX

    out: dict = {}
    if getattr(tokenizer, "has_tool_calling", False):
        out["tool_call_format"] = family_of(tokenizer)
        out["tool_grammar"] = syntax_for(tokenizer) is not None
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
    from .markers import extend_thinking

    extend_thinking(tokenizer)
    return new_loaded_model(path, "text", model, tokenizer, config)


def check_kv_layers(model) -> None:
    """Refuse kv_bits for a model with windowed cache layers (kv_quant.py)."""
    from mlx_lm.models.cache import make_prompt_cache

    check_layers(make_prompt_cache(model))


def new_loaded_model(path: Path, kind: str, model, tokenizer, config: dict, **extra) -> LoadedModel:
    """A LoadedModel before registration (the registry sets id and memory)."""
    vocab = text_config(config).get("vocab_size", config.get("vocab_size"))
    if not isinstance(vocab, int):
        vocab = len(tokenizer._tokenizer)
    return LoadedModel(
        model_id="",
        path=str(path),
        kind=kind,
        model=model,
        tokenizer=tokenizer,
        config=config,
        context_length=context_length_of(config),
        vocab_size=vocab,
        eos_token_ids=sorted(tokenizer.eos_token_ids),
        memory_bytes=0,
        **extra,
    )

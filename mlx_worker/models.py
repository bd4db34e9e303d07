"""Loaded models: loading from local folders, lookup by id, unloading."""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import errors, protocol
from .errors import WorkerError
from .model_checks import check_folder, text_config

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
    prompt_cache: Any = None  # a prompt cache store, when enabled
    vision: Any = None  # the vision adapter, for kind == "vision"
    memory_limit: Optional[int] = None  # load's memory_limit: weights + any one request
    extra: dict = field(default_factory=dict)

    @property
    def hf_tokenizer(self):
        # The Hugging Face tokenizer itself: its apply_chat_template keeps the
        # template's own defaults (mlx-lm's wrapper injects options).
        return getattr(self.tokenizer, "_tokenizer", self.tokenizer)

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
    if not config_path.is_file():
        raise WorkerError(errors.LOAD_FAILED, f"config.json not found in {path}", {"path": str(path)})
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

    def load(self, params: protocol.LoadParams) -> protocol.LoadResult:
        path = Path(params.model).expanduser()
        if not path.exists():
            raise WorkerError(
                errors.MODEL_PATH_NOT_FOUND,
                f"model path not found: {params.model} (models are loaded from local folders only)",
                {"field": "params.model", "path": params.model},
            )
        if not path.is_dir():
            raise WorkerError(
                errors.MODEL_PATH_NOT_FOUND,
                f"model path is not a folder: {params.model}",
                {"field": "params.model", "path": params.model},
            )
        path = path.resolve()
        model_id = params.model_id or path.name
        from . import prompt_cache

        prompt_cache.validate_load_params(params)
        existing = self._models.get(model_id)
        if existing is not None:
            if existing.path == str(path):
                return _load_result(existing, 0.0, already_loaded=True)
            raise WorkerError(
                errors.INVALID_PARAMS,
                f"model_id {model_id!r} is already used by {existing.path}; unload it or pick another model_id",
                {"field": "params.model_id"},
            )

        if params.memory_limit is not None and params.memory_limit <= 0:
            raise errors.invalid_params("params.memory_limit", "memory_limit must be a positive number of bytes")
        config = read_config(path)
        check_folder(path, config, params.trust_remote_code)
        from . import memory as memory_budget

        memory_budget.admit_load(path, params.memory_limit)
        start = time.perf_counter()
        import mlx.core as mx

        before = mx.get_active_memory()
        try:
            if "vision_config" in config:
                from .vision import load_vision_model

                loaded = load_vision_model(path, config, params)
            else:
                loaded = _load_text_model(path, config, params)
            _settle_random_state()
            memory = max(0, mx.get_active_memory() - before)
            failure = None
        except WorkerError as exc:
            failure = exc
        except Exception as exc:  # any failure inside a library is a load failure
            failure = _load_failure(path, config, exc)
        if failure is not None:
            # Out of the except block: its traceback (and the half-built model
            # its frames hold) is gone, so the memory really comes back.
            loaded = None
            _release()
            raise failure

        loaded.model_id = model_id
        loaded.memory_bytes = memory
        loaded.memory_limit = params.memory_limit
        if params.prefill_step_size:
            loaded.prefill_step_size = params.prefill_step_size
        loaded.max_kv_size = params.max_kv_size
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
        **_channel_info(m.tokenizer),
    )


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


def _load_text_model(path: Path, config: dict, params: protocol.LoadParams) -> LoadedModel:
    from mlx_lm import load as mlx_lm_load

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer_config: dict = {"trust_remote_code": params.trust_remote_code}
    model, tokenizer = mlx_lm_load(
        str(path), tokenizer_config=tokenizer_config, trust_remote_code=params.trust_remote_code
    )
    if params.chat_template is not None:
        tokenizer._tokenizer.chat_template = params.chat_template
    from .markers import extend_thinking

    extend_thinking(tokenizer)
    return new_loaded_model(path, "text", model, tokenizer, config)


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

"""JSON-RPC error codes and the exception that carries them to the wire (Spec: protocol/README.md § Errors)."""

from __future__ import annotations

from typing import Any

# JSON-RPC 2.0
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# The worker's own (-32000..-32099); listed in protocol/README.md.
MODEL_PATH_NOT_FOUND = -32001
LOAD_FAILED = -32002
MODEL_NOT_LOADED = -32003
CONTEXT_OVERFLOW = -32004
OUT_OF_MEMORY = -32005
BUSY = -32006
CONSTRAINT_INVALID = -32007
IMAGE_INVALID = -32008
CACHE_FILE_INVALID = -32009
SHUTTING_DOWN = -32010
GENERATION_FAILED = -32011
CANCELLED = -32012

CODES = {
    PARSE_ERROR: "parse error: the line is not valid JSON (or not UTF-8)",
    INVALID_REQUEST: "invalid request: not a JSON-RPC 2.0 request object, an oversized line, "
    "a batch, or an id already in flight",
    METHOD_NOT_FOUND: "method not found",
    INVALID_PARAMS: "invalid params: data.field names the offending field",
    INTERNAL_ERROR: "internal error: a bug in the worker; the worker keeps serving",
    MODEL_PATH_NOT_FOUND: "model path not found (never fetched from a hub)",
    LOAD_FAILED: "the model folder exists but could not be loaded",
    MODEL_NOT_LOADED: "no such model_id, or model_id omitted while zero or several models are loaded",
    CONTEXT_OVERFLOW: "the prompt is longer than the model's context",
    OUT_OF_MEMORY: "out of memory: the request would exceed a memory limit (or a prompt cache file the cache budget)",
    BUSY: "the request queue is full",
    CONSTRAINT_INVALID: "the constraint could not be compiled or uses an unsupported feature",
    IMAGE_INVALID: "an image could not be used",
    CACHE_FILE_INVALID: "a prompt cache file is missing, corrupt or from another model",
    SHUTTING_DOWN: "the worker is shutting down",
    GENERATION_FAILED: "generation failed inside MLX",
    CANCELLED: "the request was cancelled (a cancelled load: nothing of it stays loaded)",
}


class WorkerError(Exception):
    """An error answered to the host as a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


def invalid_params(field: str, message: str) -> WorkerError:
    return WorkerError(INVALID_PARAMS, f"{message} - at `{field}`", {"field": field})


def is_out_of_memory(exc: BaseException) -> bool:
    """The one test for an allocation failure (MLX raises RuntimeError with
    the allocator's message; faults.py raises MemoryError)."""
    text = (str(exc) or type(exc).__name__).lower()
    return isinstance(exc, MemoryError) or ("memory" in text and ("alloc" in text or "limit" in text))


def classify_exception(exc: BaseException) -> tuple[int, str]:
    """An unexpected exception -> (code, message); memory failures are OOM."""
    text = str(exc) or type(exc).__name__
    if is_out_of_memory(exc):
        return OUT_OF_MEMORY, f"out of memory: {text}"
    return INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {text}"

"""Constrained generation: JSON schema, regex, choice and Lark grammars.

``compile_for(lm, constraint)`` compiles with the chosen engine (llguidance by
default, or outlines) before any token, or raises -32007 naming the problem;
never unconstrained output. Compiled constraints and refusals are cached per
(tokenizer, engine, constraint); a failure of the moment is not.
Spec: protocol/README.md § Constrained generation.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable

import msgspec

from .. import errors, protocol
from ..errors import WorkerError
from . import vocab
from .common import check_json_schema, is_engine_panic, refuse
from .processor import ConstraintProcessor

log = logging.getLogger("mlx_worker.constraints")

DEFAULT_ENGINE = "llguidance"
ENGINES = ("llguidance", "outlines")
MAX_PROGRAMS = 64
MAX_TOKENIZERS = 4
# Failures of the moment (memory, I/O), not of the constraint: never cached.
TRANSIENT = (MemoryError, OSError)


class _LRU(collections.OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make: Callable[[], Any]):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        if len(self) > self.size:
            self.popitem(last=False)
        return value


_tokenizers = _LRU(MAX_TOKENIZERS)
_programs = _LRU(MAX_PROGRAMS)


class Compiled:
    """One request's handle on a (shared, cached) compiled constraint."""

    def __init__(self, program, info: vocab.TokenizerInfo):
        self.program = program
        self.info = info
        self.engine = program.engine

    def processor(self) -> ConstraintProcessor:
        return ConstraintProcessor(self.program.matcher(), self.info)

    def complete(self, tokens: list[int]) -> bool:
        """Do ``tokens`` (no terminating EOS) form a complete match?"""
        m = self.program.matcher()
        return all(m.consume(t) for t in tokens) and bool(m.accepting())

    def release(self) -> None:
        self.program = None  # the cache keeps what is worth keeping


def compile_for(lm, constraint: protocol.Constraint) -> Compiled:
    engine = constraint.engine or DEFAULT_ENGINE
    key = vocab.tokenizer_key(lm)
    info = _tokenizers.get_or(key, lambda: vocab.build(lm, key))
    canonical = msgspec.json.encode(msgspec.structs.replace(constraint, engine=None))
    program = _programs.get_or((key, engine, canonical), lambda: _compile(engine, info, constraint))
    if isinstance(program, WorkerError):
        raise WorkerError(program.code, program.message, program.data)
    return Compiled(program, info)


def _compile(engine: str, info: vocab.TokenizerInfo, constraint) -> Any:
    """A Program, or the WorkerError saying why not (cached like a Program)."""
    start = time.perf_counter()
    try:
        if isinstance(constraint, protocol.JsonSchemaConstraint):
            check_json_schema(constraint.schema)
        if engine == "outlines":
            from . import outlines_engine as module
        else:
            from . import llguidance_engine as module  # type: ignore[no-redef]
        program = module.compile(info, constraint)
    except WorkerError as exc:
        return exc
    except RecursionError:
        return refuse("the constraint is nested too deeply")
    except TRANSIENT as exc:
        # Says nothing about the constraint: raised, so it is not cached and
        # the next request compiles it again.
        log.warning("%s failed to compile a constraint: %r (not cached)", engine, exc)
        code = errors.OUT_OF_MEMORY if errors.is_out_of_memory(exc) else errors.INTERNAL_ERROR
        raise WorkerError(code, f"{engine} could not compile the constraint now: {type(exc).__name__}: {exc}",
                          {"field": "params.constraint", "engine": engine}) from None
    except Exception as exc:  # the engine failed on this input: refuse it, never run unconstrained
        log.warning("%s failed to compile a constraint", engine, exc_info=True)
        return refuse(f"{engine} could not compile the constraint: {type(exc).__name__}: {exc}", engine=engine)
    except BaseException as exc:
        if not is_engine_panic(exc):
            raise
        return refuse(f"{engine} could not compile the constraint: {exc}", engine=engine)
    log.info("compiled a %s constraint with %s in %.1f ms", type(constraint).__name__, engine,
             (time.perf_counter() - start) * 1000)
    return program

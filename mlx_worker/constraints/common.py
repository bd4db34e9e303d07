"""Pieces both engines share: the refusal error and literal regexes (Spec: protocol/README.md § Constrained generation, § Errors)."""

from __future__ import annotations

from typing import Any

from .. import errors
from ..errors import WorkerError

FIELD = "params.constraint"


def refuse(message: str, field: str = FIELD, **data: Any) -> WorkerError:
    """-32007: the constraint can't be compiled, or the engine would not
    enforce part of it. Raised before any token is generated."""
    return WorkerError(errors.CONSTRAINT_INVALID, message, {"field": field, **data})


def is_engine_panic(exc: BaseException) -> bool:
    """A Rust panic inside an engine surfaces as pyo3's PanicException, a
    BaseException: it must become an error reply, not end the compute thread."""
    return type(exc).__name__ == "PanicException"


def literal_regex(text: str) -> str:
    """A regex matching exactly ``text``. Everything but ASCII letters and
    digits becomes ``\\x{HEX}``, which both engines' Rust regex parsers read
    the same way (no escaping rules to disagree on)."""
    return "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):X}}}" for c in text)


def choice_regex(options: list[str]) -> str:
    if not options:
        raise refuse("choice needs at least one option", f"{FIELD}.options")
    # Longest first: outlines' automaton takes the first alternative that
    # matches (leftmost-first), so a prefix listed first would hide the longer one.
    unique = sorted(set(options), key=lambda s: (-len(s), s))
    return "(?:" + "|".join(literal_regex(o) for o in unique) + ")"


def check_json_schema(schema: Any) -> None:
    """Reject a schema that is not valid against its own meta-schema (a typo
    such as ``"minimum": "3"`` must not be quietly dropped by an engine)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise refuse(f"a JSON schema is an object or a boolean, not {type(schema).__name__}", f"{FIELD}.schema")
    try:
        from jsonschema import validators
        from jsonschema.exceptions import SchemaError
    except ImportError:  # optional: the engines still check what they use
        return
    try:
        cls = validators.validator_for(schema, default=validators.Draft202012Validator)
        cls.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise refuse(
            f"invalid JSON schema: {exc.message}" + (f" (at #/{where})" if where else ""),
            f"{FIELD}.schema",
        ) from None

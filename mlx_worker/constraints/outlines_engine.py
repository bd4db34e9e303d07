"""The outlines engine: outlines-core's regex index (JSON schema, regex, choice).

A JSON schema goes through ``outlines_schema.prepare`` (refuse what
outlines-core would not enforce), then regex -> ``Index(regex, Vocabulary)``,
shared by requests; each request walks it with its own ``Guide``. Lark
grammars are refused (-32007). Spec: protocol/README.md § Constrained generation, § Engines.
"""

from __future__ import annotations

import json

from outlines_core import Guide, Index
from outlines_core.json_schema import build_regex_from_schema

from .. import protocol
from . import outlines_schema
from .common import FIELD, choice_regex, refuse

NAME = "outlines"

# At most one space where JSON allows whitespace: bounded, so no runaway.
WHITESPACE = r"[ ]?"
# Tokens a request may roll back (speculative decoding rewinds a few).
MAX_ROLLBACK = 32


class Matcher:
    __slots__ = ("g", "accepting", "rollback")

    def __init__(self, guide: Guide):
        self.g = guide
        self.accepting = guide.is_finished
        self.rollback = guide.rollback_state

    def consume(self, token: int) -> bool:
        try:
            self.g.advance(token, return_tokens=False)
            return True
        except ValueError:
            return False

    def fill(self, ptr: int, nbytes: int) -> bool:
        self.g.write_mask_into(ptr, nbytes // 4, 4)
        return True

    def error(self) -> str:
        return "not allowed in this state"


class Program:
    engine = NAME

    def __init__(self, index: Index, regex: str):
        self.index = index
        self.regex = regex

    def matcher(self) -> Matcher:
        return Matcher(Guide(self.index, max_rollback=MAX_ROLLBACK))


def regex_for(constraint) -> str:
    if isinstance(constraint, protocol.JsonSchemaConstraint):
        schema = outlines_schema.prepare(constraint.schema)
        try:
            return build_regex_from_schema(json.dumps(schema), WHITESPACE)
        except ValueError as exc:
            raise refuse(f"JSON schema rejected by outlines: {exc}", f"{FIELD}.schema", engine=NAME) from None
    if isinstance(constraint, protocol.RegexConstraint):
        return _strip_anchors(constraint.pattern)
    if isinstance(constraint, protocol.ChoiceConstraint):
        return choice_regex(constraint.options)
    raise refuse(
        'the outlines engine does not support Lark grammars; use engine "llguidance"',
        f"{FIELD}.lark",
        engine=NAME,
    )


def compile(info, constraint) -> Program:
    regex = regex_for(constraint)
    try:
        index = Index(regex, info.outlines_vocabulary())
    except (ValueError, RuntimeError) as exc:
        field = f"{FIELD}.pattern" if isinstance(constraint, protocol.RegexConstraint) else FIELD
        raise refuse(f"outlines could not compile the constraint: {exc}", field, engine=NAME) from None
    return Program(index, regex)


def _strip_anchors(pattern: str) -> str:
    """The pattern must match the whole output in both engines; outlines'
    index refuses explicit outer anchors, so drop them."""
    if pattern.startswith("^"):
        pattern = pattern[1:]
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1]
    return pattern

"""The default engine: llguidance (JSON schema, regex, choice, Lark grammars).

Compilation builds one ``LLMatcher`` per constraint and keeps it as a
prototype; each request gets a ``deep_copy``. llguidance never raises for
grammar problems: its error state is checked after construction and after
every step. Spec: protocol/README.md § Constrained generation, § Engines.
"""

from __future__ import annotations

import re

import llguidance
from llguidance import LLMatcher

from .. import protocol
from .common import FIELD, choice_regex, refuse

NAME = "llguidance"

# Tight whitespace: exactly the separators of Python's json.dumps, nothing
# else between tokens, so a model can't pad with whitespace until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Applied after the schema's own "x-guidance" options: a schema can't switch
# on "lenient", which ignores keywords llguidance doesn't implement.
JSON_OVERRIDES = {"lenient": False}

_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


class Matcher:
    __slots__ = ("m", "consume", "accepting", "rollback")

    def __init__(self, m: LLMatcher):
        self.m = m
        self.consume = m.consume_token
        self.accepting = m.is_accepting
        self.rollback = m.rollback

    def fill(self, ptr: int, nbytes: int) -> bool:
        """Write the next-token bitmask; False if the matcher failed."""
        self.m.unsafe_compute_mask_ptr(ptr, nbytes)
        return not self.m.is_error()

    def failed(self) -> bool:
        return self.m.is_error()

    def error(self) -> str:
        return _one_line(self.m.get_error())


class Program:
    engine = NAME

    def __init__(self, proto: LLMatcher):
        self.proto = proto

    def matcher(self) -> Matcher:
        return Matcher(self.proto.deep_copy())


def grammar_for(constraint) -> str:
    if isinstance(constraint, protocol.JsonSchemaConstraint):
        schema = constraint.schema
        if schema is True:
            schema = {}  # any JSON value (llguidance applies options to objects only)
        elif schema is False:
            raise refuse("the JSON schema `false` matches nothing", f"{FIELD}.schema", engine=NAME)
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS, overrides=JSON_OVERRIDES)
        except (ValueError, TypeError) as exc:
            raise refuse(f"invalid JSON schema: {exc}", f"{FIELD}.schema", engine=NAME) from None
    if isinstance(constraint, protocol.RegexConstraint):
        return LLMatcher.grammar_from_regex(constraint.pattern)
    if isinstance(constraint, protocol.ChoiceConstraint):
        return LLMatcher.grammar_from_regex(choice_regex(constraint.options))
    return LLMatcher.grammar_from_lark(constraint.lark)


def compile(info, constraint) -> Program:
    grammar = grammar_for(constraint)
    field = _field_of(constraint)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, info.lltok, limits=_LIMITS)
    if is_error:
        raise refuse(f"{_kind(constraint)} rejected by llguidance: {_one_line(messages[0])}", field, engine=NAME)
    proto = LLMatcher(info.lltok, grammar, log_level=0, limits=_LIMITS)
    if proto.is_error():
        raise refuse(f"{_kind(constraint)} rejected by llguidance: {_one_line(proto.get_error())}", field, engine=NAME)
    return Program(proto)


def _kind(constraint) -> str:
    return {
        protocol.JsonSchemaConstraint: "JSON schema",
        protocol.RegexConstraint: "regex",
        protocol.ChoiceConstraint: "choice",
        protocol.GrammarConstraint: "Lark grammar",
    }[type(constraint)]


def _field_of(constraint) -> str:
    return FIELD + {
        protocol.JsonSchemaConstraint: ".schema",
        protocol.RegexConstraint: ".pattern",
        protocol.ChoiceConstraint: ".options",
        protocol.GrammarConstraint: ".lark",
    }[type(constraint)]


def _one_line(message: str) -> str:
    """llguidance messages span lines (a caret under the regex, a state dump):
    one line, bounded, for the error object."""
    message = message.split("<state>")[0]
    message = re.sub(r"\s+", " ", message).strip()
    return (message[:400] + "...") if len(message) > 400 else (message or "unknown error")

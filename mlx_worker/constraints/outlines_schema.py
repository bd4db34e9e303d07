"""JSON schema -> a schema outlines-core enforces exactly, or a refusal.

outlines-core quietly drops keywords it doesn't implement, so the schema is
checked here keyword by keyword and rewritten into the subset it gets right
(local ``$ref``s inlined, formats as JSON-safe patterns); anything else is
refused with -32007 naming the keyword. Stricter than the original, never
looser. Spec: protocol/README.md § Constrained generation, § Engines.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import unquote

from .common import FIELD, refuse

ENGINE = "outlines"

# Keywords with no effect on validation.
ANNOTATIONS = frozenset(
    {"title", "description", "$schema", "$id", "$comment", "examples", "default", "deprecated",
     "readOnly", "writeOnly", "$defs", "definitions"}
)

_DATE = (
    r"[1-9][0-9]{3}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
    r"|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))"
)
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_LABEL = r"[a-z0-9]+(?:-[a-z0-9]+)*"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# Formats as patterns that only match valid values and never need escaping
# inside a JSON string (no quote, backslash or control character).
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "email": rf"[a-z0-9]+(?:[._+-][a-z0-9]+)*@{_LABEL}(?:\.{_LABEL})*\.[a-z]{{2,12}}",
    "hostname": rf"{_LABEL}(?:\.{_LABEL})*",
    "ipv4": rf"{_OCTET}(?:\.{_OCTET}){{3}}",
    "uri": rf"https?://{_LABEL}(?:\.{_LABEL})*(?:/[A-Za-z0-9._~-]*)*",
}

# A value the schema leaves open. outlines-core's own "any value" nests
# objects and arrays two levels deep and its index can take minutes to build
# (an untyped array with maxItems 3: 60 s at a 1k vocabulary), so open values
# are generated from this smaller language: a primitive, or at the top of an
# open value a flat array or object of primitives. Stricter, still valid.
PRIMITIVE = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]}
ANY = {"anyOf": PRIMITIVE["anyOf"] + [
    {"type": "array", "items": PRIMITIVE},
    {"type": "object", "additionalProperties": PRIMITIVE},
]}

_JSON_TYPES = ("string", "number", "integer", "boolean", "null", "array", "object")
_BY_TYPE = {
    "string": {"minLength", "maxLength", "pattern", "format"},
    "number": set(),
    "integer": set(),
    "boolean": set(),
    "null": set(),
    "array": {"items", "minItems", "maxItems"},
    "object": {"additionalProperties", "minProperties", "maxProperties"},
}


def prepare(schema: Any) -> dict:
    """The schema to hand to ``build_regex_from_schema``; raises -32007."""
    return _Prep(schema).node(schema, "#", ())


class _Prep:
    def __init__(self, root: Any):
        self.root = root

    def node(self, s: Any, path: str, refs: tuple) -> dict:
        if s is True:
            return ANY
        if not isinstance(s, dict):
            _no(f"the schema {json.dumps(s)[:40]} (outlines needs an object schema)", path)
        if "$ref" in s:
            return self.ref(s, path, refs)
        keys = set(s) - ANNOTATIONS
        if not keys:
            return ANY
        branches = [k for k in ("properties", "allOf", "anyOf", "oneOf", "prefixItems", "enum", "const") if k in s]
        if len(branches) > 1:
            _no(f"{' and '.join(branches)} together (outlines uses only {branches[0]})", path)
        if branches:
            return getattr(self, "b_" + branches[0])(s, path, refs, keys - {branches[0]})
        if "type" not in s:
            _no(f"{_keys(keys)} without a type", path)
        return self.typed(s, path, refs, keys)

    # ------------------------------------------------------------ branches

    def b_properties(self, s, path, refs, rest) -> dict:
        self.allow(rest, {"type", "required", "additionalProperties", "unevaluatedProperties"}, path)
        self.type_allows(s, "object", path)
        props = s["properties"]
        required = s.get("required", [])
        missing = [r for r in required if r not in props]
        if missing:
            _no(f"required {missing} not listed in properties (outlines would leave them out)", path)
        out = {}
        for name, sub in props.items():
            if any(c in name for c in '"\\') or any(ord(c) < 0x20 for c in name):
                _no(f"property name {name!r} (it needs JSON escapes, which outlines leaves out)", path)
            out[name] = self.node(sub, f"{path}/properties/{_esc(name)}", refs)
        # Only the listed properties are ever generated, which satisfies any
        # additionalProperties; it is dropped.
        return {"type": "object", "properties": out, "required": list(required)}

    def b_allOf(self, s, path, refs, rest) -> dict:
        self.allow(rest, set(), path)
        if len(s["allOf"]) != 1:
            _no("allOf with several subschemas (outlines concatenates them)", path)
        return self.node(s["allOf"][0], f"{path}/allOf/0", refs)

    def b_anyOf(self, s, path, refs, rest) -> dict:
        self.allow(rest, set(), path)
        return {"anyOf": [self.node(b, f"{path}/anyOf/{i}", refs) for i, b in enumerate(s["anyOf"])]}

    def b_oneOf(self, s, path, refs, rest) -> dict:
        self.allow(rest, set(), path)
        branches = [self.node(b, f"{path}/oneOf/{i}", refs) for i, b in enumerate(s["oneOf"])]
        # outlines treats oneOf as anyOf: fine only if no value can match two branches.
        if not _disjoint(branches):
            _no("oneOf whose branches may overlap (outlines treats oneOf as anyOf)", path)
        return {"anyOf": branches}

    def b_prefixItems(self, s, path, refs, rest) -> dict:
        self.allow(rest, {"type", "items", "minItems", "maxItems"}, path)
        self.type_allows(s, "array", path)
        n = len(s["prefixItems"])
        if s.get("minItems", 0) > n or s.get("maxItems", n) < n:
            _no("minItems/maxItems other than the prefixItems count", path)
        return {"prefixItems": [self.node(b, f"{path}/prefixItems/{i}", refs) for i, b in enumerate(s["prefixItems"])]}

    def b_enum(self, s, path, refs, rest) -> dict:
        self.allow(rest, {"type"}, path)
        return {"enum": self.values(s["enum"], s, path)}

    def b_const(self, s, path, refs, rest) -> dict:
        self.allow(rest, {"type"}, path)
        return {"const": self.values([s["const"]], s, path)[0]}

    def values(self, values: list, s: dict, path: str) -> list:
        for v in values:
            if isinstance(v, (dict, list)):
                _no("enum/const with an object or array value", path)
            if "type" in s and not any(_is_type(v, t) for t in _types(s)):
                _no(f"enum/const value {json.dumps(v)} that is not of type {s['type']}", path)
        return values

    # --------------------------------------------------------------- types

    def typed(self, s, path, refs, keys) -> dict:
        types = _types(s)
        for t in types:
            if t not in _JSON_TYPES:
                _no(f"type {t!r}", path)
        allowed = set().union(*(_BY_TYPE[t] for t in types))
        self.allow(keys - {"type"}, allowed, path)
        out: dict = {"type": s["type"]}
        if "string" in types:
            out.update(self.string(s, path))
        if "array" in types:
            out.update(self.array(s, path, refs))
        if "object" in types:
            out.update(self.obj(s, path, refs))
        return out

    def string(self, s, path) -> dict:
        used = [k for k in ("pattern", "format") if k in s]
        if {"minLength", "maxLength"} & set(s):
            used.insert(0, "minLength/maxLength")
        if len(used) > 1:
            _no(f"{' with '.join(used)} (outlines applies only {used[0]})", path)
        if "format" in s:
            if s["format"] not in FORMATS:
                _no(f"format {s['format']!r}", path)
            return {"pattern": f"(?:{FORMATS[s['format']]})"}
        if "pattern" in s:
            return {"pattern": f"(?:{safe_pattern(s['pattern'], path)})"}
        return {k: s[k] for k in ("minLength", "maxLength") if k in s}

    def array(self, s, path, refs) -> dict:
        out = {k: s[k] for k in ("minItems", "maxItems") if k in s}
        items = s.get("items", True)
        if items is False:
            out["maxItems"] = 0
        elif isinstance(items, list):
            _no("items as a list (use prefixItems)", path)
        elif items is True or not set(items) - ANNOTATIONS:
            out["items"] = PRIMITIVE
        else:
            out["items"] = self.node(items, f"{path}/items", refs)
        return out

    def obj(self, s, path, refs) -> dict:
        out = {k: s[k] for k in ("minProperties", "maxProperties") if k in s}
        extra = s.get("additionalProperties", True)
        if extra is False:
            out["maxProperties"] = 0  # no properties listed and none allowed: {}
        elif extra is True or (isinstance(extra, dict) and not set(extra) - ANNOTATIONS):
            out["additionalProperties"] = PRIMITIVE
        else:
            out["additionalProperties"] = self.node(extra, f"{path}/additionalProperties", refs)
        return out

    # ---------------------------------------------------------------- refs

    def ref(self, s, path, refs) -> dict:
        self.allow(set(s) - ANNOTATIONS - {"$ref"}, set(), path, what="next to $ref")
        target = s["$ref"]
        if not isinstance(target, str) or not target.startswith("#"):
            _no(f"$ref {target!r} (only local references)", path)
        pointer = unquote(target[1:])
        if pointer in refs:
            _no(f"recursive $ref {target!r} (outlines unrolls a fixed depth and drops required properties)", path)
        node = self.root
        for part in pointer.split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                _no(f"$ref {target!r}, which points nowhere", path, invalid=True)
        return self.node(node, target, refs + (pointer,))

    # ------------------------------------------------------------- helpers

    def allow(self, keys: set, allowed: set, path: str, what: str = "") -> None:
        extra = sorted(keys - allowed)
        if extra:
            _no(f"{_keys(extra)}{' ' + what if what else ''}", path)

    def type_allows(self, s, t: str, path: str) -> None:
        if "type" in s and t not in _types(s):
            _no(f"type {s['type']!r} with {t} keywords", path)


def safe_pattern(pattern: str, path: str) -> str:
    """A JSON-schema pattern outlines can place between quotes as-is: it must
    not match a quote, a backslash or a control character (those need escapes
    in JSON, and outlines matches the raw text). Outer anchors are dropped;
    outlines matches the whole string anyway (stricter than a search)."""
    inner = pattern[1:] if pattern.startswith("^") else pattern
    if inner.endswith("$") and not inner.endswith("\\$"):
        inner = inner[:-1]
    try:
        parsed = _sre_parse(inner)
    except re.error as exc:
        raise refuse(f"invalid pattern {pattern!r}: {exc}", f"{FIELD}.schema", at=path) from None
    why = _unsafe(parsed)
    if why:
        _no(f"pattern {pattern!r} ({why}; outlines would emit it unescaped)", path)
    return inner


def _sre_parse(pattern: str):
    try:
        import re._parser as sre_parse  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import sre_parse  # type: ignore[no-redef]
    return sre_parse.parse(pattern)


def _unsafe(parsed) -> str:
    try:
        import re._constants as c  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import sre_constants as c  # type: ignore[no-redef]

    ok_categories = {c.CATEGORY_DIGIT, c.CATEGORY_WORD}

    def bad_char(code: int) -> bool:
        return code < 0x20 or code in (0x22, 0x5C)

    def walk(items) -> str:
        for op, av in items:
            if op is c.LITERAL:
                if bad_char(av):
                    return f"it matches {chr(av)!r}"
            elif op is c.IN:
                for sub_op, sub_av in av:
                    if sub_op is c.NEGATE:
                        return "a negated class"
                    if sub_op is c.LITERAL and bad_char(sub_av):
                        return f"it matches {chr(sub_av)!r}"
                    if sub_op is c.RANGE and (sub_av[0] < 0x20 or any(sub_av[0] <= x <= sub_av[1] for x in (0x22, 0x5C))):
                        return "a range with a quote, backslash or control character"
                    if sub_op is c.CATEGORY and sub_av not in ok_categories:
                        return "a class such as \\s, \\S, \\D or \\W"
            elif op is c.CATEGORY:
                if av not in ok_categories:
                    return "a class such as \\s, \\S, \\D or \\W"
            elif op in (c.MAX_REPEAT, c.MIN_REPEAT):
                why = walk(av[2])
                if why:
                    return why
            elif op is c.SUBPATTERN:
                why = walk(av[-1])
                if why:
                    return why
            elif op is c.BRANCH:
                for branch in av[1]:
                    why = walk(branch)
                    if why:
                        return why
            elif op is c.ANY:
                return "'.'"
            elif op is c.NOT_LITERAL:
                return "a negated character"
            else:
                return f"{str(op).lower()} is not supported"
        return ""

    return walk(parsed)


def _types(s: dict) -> list:
    t = s.get("type")
    return list(t) if isinstance(t, list) else [t]


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        return "integer"
    return "number" if isinstance(v, float) else "string"


def _is_type(v: Any, t: str) -> bool:
    jt = _json_type(v)
    return jt == t or (t == "number" and jt == "integer")


def _kinds(s: dict):
    """The JSON types a prepared schema can produce, or consts as ("=", json)."""
    if "const" in s:
        return {("=", json.dumps(s["const"]))}
    if "enum" in s:
        return {("=", json.dumps(v)) for v in s["enum"]}
    if "anyOf" in s:
        out: set = set()
        for b in s["anyOf"]:
            out |= _kinds(b)
        return out
    if "properties" in s:
        return {"object"}
    if "prefixItems" in s:
        return {"array"}
    if "type" in s:
        return set(_types(s))
    return set(_JSON_TYPES)


def _disjoint(branches: list) -> bool:
    """True when no JSON value can match two of the branches (judged by JSON
    type, or by value when both branches are consts/enums)."""

    def as_types(kinds: set) -> set:
        out = {_json_type(json.loads(k[1])) if isinstance(k, tuple) else k for k in kinds}
        if "integer" in out:
            out.add("number")  # every integer is a number
        return out

    kinds = [_kinds(b) for b in branches]
    for i, a in enumerate(kinds):
        for b in kinds[i + 1 :]:
            if all(isinstance(k, tuple) for k in a | b):
                if a & b:
                    return False
            elif as_types(a) & as_types(b):
                return False
    return True


def _keys(keys) -> str:
    keys = sorted(keys)
    return ("keywords " if len(keys) > 1 else "keyword ") + ", ".join(repr(k) for k in keys)


def _esc(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _no(what: str, path: str, invalid: bool = False) -> None:
    message = f"invalid JSON schema: {what}" if invalid else (
        f"the outlines engine does not support {what}; use engine \"llguidance\""
    )
    raise refuse(f"{message} (at {path})", f"{FIELD}.schema", engine=ENGINE, at=path)

"""JSON schemas for the constrained-generation tests, and what each engine refuses.

Each entry: name -> schema. ``REFUSED[engine]`` lists, for every schema that
engine rejects with -32007, a substring of the expected error message: the
sweep asserts the refusal (so a refusal can't hide as a skip), and asserts
that every schema not listed compiles and yields valid JSON.
"""

from __future__ import annotations

ADDRESS = {
    "type": "object",
    "properties": {
        "street": {"type": "string", "maxLength": 20},
        "city": {"type": "string", "maxLength": 12},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
    },
    "required": ["street", "city"],
}

SCHEMAS: dict[str, object] = {
    # ------------------------------------------------------------ primitives
    "string": {"type": "string"},
    "integer": {"type": "integer"},
    "number": {"type": "number"},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "type-list": {"type": ["string", "null"]},
    "type-list-number-bool": {"type": ["number", "boolean"]},
    "any": {},
    "true-schema": True,
    # --------------------------------------------------------------- objects
    "object-required": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "object-optional": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}},
    },
    "object-mixed": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "note": {"type": "string"}, "ok": {"type": "boolean"}},
        "required": ["ok"],
    },
    "object-nested-2": {
        "type": "object",
        "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}},
        "required": ["user"],
    },
    "object-nested-3": {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {"b": {"type": "object", "properties": {"c": {"type": "boolean"}}, "required": ["c"]}},
                "required": ["b"],
            }
        },
        "required": ["a"],
    },
    "additional-false": {
        "type": "object",
        "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
        "required": ["x"],
        "additionalProperties": False,
    },
    "additional-true": {
        "type": "object",
        "properties": {"x": {"type": "boolean"}},
        "required": ["x"],
        "additionalProperties": True,
    },
    "additional-schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "object-free": {"type": "object"},
    "object-empty-only": {"type": "object", "additionalProperties": False},
    "min-max-properties": {
        "type": "object",
        "additionalProperties": {"type": "boolean"},
        "minProperties": 1,
        "maxProperties": 3,
    },
    "properties-with-min-properties": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "minProperties": 1,
    },
    "pattern-properties": {
        "type": "object",
        "patternProperties": {"^n_": {"type": "integer"}},
        "additionalProperties": False,
    },
    "required-unlisted": {"type": "object", "required": ["must"]},
    "escaped-keys": {
        "type": "object",
        "properties": {'qu"ote': {"type": "integer"}, "with space": {"type": "boolean"}, "caf\u00e9": {"type": "null"}},
        "required": ['qu"ote', "with space", "caf\u00e9"],
    },
    # ---------------------------------------------------------------- arrays
    "array-strings": {"type": "array", "items": {"type": "string", "maxLength": 8}},
    "array-min-max": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "array-min-1": {"type": "array", "items": {"type": "boolean"}, "minItems": 1},
    "array-max-0": {"type": "array", "maxItems": 0},
    "array-of-objects": {
        "type": "array",
        "items": {"type": "object", "properties": {"k": {"type": "string", "maxLength": 6}}, "required": ["k"]},
        "maxItems": 3,
    },
    "array-untyped-items": {"type": "array", "maxItems": 3},
    "array-nested": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}, "maxItems": 3},
    "tuple": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}, {"type": "boolean"}], "items": False},
    "unique-items": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "contains": {"type": "array", "contains": {"type": "integer"}},
    # ------------------------------------------------------------ enum, const
    "enum-strings": {"enum": ["red", "green", "blue"]},
    "enum-mixed": {"enum": [1, "one", None, True, 2.5]},
    "enum-typed": {"type": "string", "enum": ["a", "bb", "ccc"]},
    "enum-objects": {"enum": [{"a": 1}, [1, 2]]},
    "const-string": {"const": "fixed value"},
    "const-number": {"const": 42},
    "const-unicode": {"const": "caf\u00e9 \u2713"},
    "const-in-object": {
        "type": "object",
        "properties": {"kind": {"const": "event"}, "n": {"type": "integer"}},
        "required": ["kind", "n"],
    },
    # ----------------------------------------------------------- composition
    "anyof-primitives": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "integer"}]},
    "anyof-objects": {
        "anyOf": [
            {"type": "object", "properties": {"cat": {"type": "string"}}, "required": ["cat"], "additionalProperties": False},
            {"type": "object", "properties": {"dog": {"type": "integer"}}, "required": ["dog"], "additionalProperties": False},
        ]
    },
    "nullable": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
    "oneof-disjoint": {"oneOf": [{"type": "string", "maxLength": 4}, {"type": "boolean"}, {"type": "null"}]},
    "oneof-consts": {"oneOf": [{"const": "a"}, {"const": "b"}, {"enum": ["c", "d"]}]},
    "oneof-overlapping": {"oneOf": [{"type": "integer"}, {"type": "number"}]},
    "allof-single": {"allOf": [{"type": "object", "properties": {"q": {"type": "boolean"}}, "required": ["q"]}]},
    "allof-merge": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]},
        ]
    },
    "anyof-next-to-properties": {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "anyOf": [{"required": ["a"]}],
    },
    "not": {"not": {"type": "string"}},
    "if-then-else": {"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}},
    # ------------------------------------------------------------ $ref/$defs
    "ref-defs": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]}},
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
        "required": ["from", "to"],
    },
    "ref-definitions": {
        "definitions": {"flag": {"type": "boolean"}},
        "type": "array",
        "items": {"$ref": "#/definitions/flag"},
        "maxItems": 4,
    },
    "ref-chain": {
        "$defs": {
            "a": {"$ref": "#/$defs/b"},
            "b": {"$ref": "#/$defs/c"},
            "c": {"$ref": "#/$defs/d"},
            "d": {"$ref": "#/$defs/e"},
            "e": {"type": "object", "properties": {"leaf": {"type": "boolean"}}, "required": ["leaf"]},
        },
        "$ref": "#/$defs/a",
    },
    "ref-recursive-tree": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
                },
                "required": ["v"],
            }
        },
        "$ref": "#/$defs/node",
    },
    "ref-recursive-list": {
        "type": "object",
        "properties": {"head": {"type": "integer"}, "tail": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
        "required": ["head", "tail"],
    },
    "ref-missing": {"$ref": "#/$defs/nowhere"},
    # --------------------------------------------------------------- strings
    "pattern-anchored": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
    "pattern-unanchored": {"type": "string", "pattern": "[a-z]+"},
    "pattern-alternation": {"type": "string", "pattern": "^(cat|dog|bird)$"},
    "pattern-any-char": {"type": "string", "pattern": "^a.{1,3}$"},
    "length-bounds": {"type": "string", "minLength": 2, "maxLength": 6},
    "min-length": {"type": "string", "minLength": 3},
    "length-and-pattern": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
    "format-date": {"type": "string", "format": "date"},
    "format-date-time": {"type": "string", "format": "date-time"},
    "format-time": {"type": "string", "format": "time"},
    "format-email": {"type": "string", "format": "email"},
    "format-uuid": {"type": "string", "format": "uuid"},
    "format-ipv4": {"type": "string", "format": "ipv4"},
    "format-hostname": {"type": "string", "format": "hostname"},
    "format-uri": {"type": "string", "format": "uri"},
    "format-unknown": {"type": "string", "format": "not-a-format"},
    # ------------------------------------------------------- numeric bounds
    "integer-bounds": {"type": "integer", "minimum": 3, "maximum": 17},
    "integer-negative-bounds": {"type": "integer", "minimum": -50, "maximum": -10},
    "integer-exclusive": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5},
    "number-bounds": {"type": "number", "minimum": -1.5, "maximum": 2.25},
    "multiple-of": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100},
    "bounded-in-object": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}, "score": {"type": "number", "minimum": 0}},
        "required": ["age", "score"],
    },
    # ------------------------------------------------------------- realistic
    "tool-call": {
        "type": "object",
        "properties": {
            "name": {"enum": ["get_weather", "search"]},
            "arguments": {
                "type": "object",
                "properties": {"query": {"type": "string", "maxLength": 16}, "limit": {"type": "integer"}},
                "required": ["query"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    },
    "person": {
        "$defs": {"address": ADDRESS},
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 16},
            "email": {"type": "string", "format": "email"},
            "born": {"type": "string", "format": "date"},
            "address": {"$ref": "#/$defs/address"},
            "phones": {"type": "array", "items": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}, "maxItems": 2},
            "vip": {"type": "boolean"},
        },
        "required": ["name", "email", "address"],
        "additionalProperties": False,
    },
    "many-optional": {
        "type": "object",
        "properties": {k: {"type": "integer"} for k in "abcde"},
        "additionalProperties": False,
    },
    "draft-07": {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Thing",
        "description": "annotations are ignored",
        "type": "object",
        "properties": {"id": {"type": "string", "format": "uuid"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3}},
        "required": ["id"],
    },
}

# Schemas an engine refuses with -32007 (substring of the message). The
# outlines engine refuses what outlines-core would not enforce.
REFUSED: dict[str, dict[str, str]] = {
    "llguidance": {
        "properties-with-min-properties": "min/maxProperties",
        "unique-items": "uniqueItems",
        "contains": "contains",
        "oneof-overlapping": "oneOf",
        "not": "not",
        "if-then-else": "if",
        "ref-missing": "nowhere",
        "format-unknown": "not-a-format",
    },
    "outlines": {
        "properties-with-min-properties": "minProperties",
        "pattern-properties": "patternProperties",
        "required-unlisted": "required",
        "escaped-keys": "JSON escapes",
        "unique-items": "uniqueItems",
        "contains": "contains",
        "enum-objects": "object or array value",
        "oneof-overlapping": "oneOf",
        "allof-merge": "allOf",
        "anyof-next-to-properties": "anyOf",
        "not": "not",
        "if-then-else": "if",
        "ref-recursive-tree": "recursive $ref",
        "ref-recursive-list": "recursive $ref",
        "ref-missing": "nowhere",
        "pattern-any-char": "'.'",
        "length-and-pattern": "with pattern",
        "format-unknown": "not-a-format",
        "integer-bounds": "minimum",
        "integer-negative-bounds": "minimum",
        "integer-exclusive": "exclusiveM",
        "number-bounds": "minimum",
        "multiple-of": "multipleOf",
        "bounded-in-object": "minimum",
    },
}

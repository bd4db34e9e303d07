"""Generate the C++ protocol types from protocol/schema.json.

    python clients/cpp/tools/gen_types.py            # rewrite the generated files
    python clients/cpp/tools/gen_types.py --check    # exit 1 if they are stale

Writes include/mlx_worker/protocol.hpp (structs, method traits, error codes) and
src/protocol.cpp (to_json / from_json). Standard library only, so any Python 3 runs it.

Mapping: a property that is not required, or may be null, is a std::optional that
to_json omits when unset (the worker rejects null for its booleans); integers are
int64_t except `seed` (uint64_t: the worker takes seeds up to 2^64-1); a union of
tagged objects or of values with different JSON types is a std::variant; any other
union or free-form object is nlohmann::json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPP = HERE.parent
ROOT = CPP.parent.parent
SCHEMA = ROOT / "protocol" / "schema.json"
HEADER = CPP / "include" / "mlx_worker" / "protocol.hpp"
SOURCE = CPP / "src" / "protocol.cpp"

UINT64_PROPERTIES = {"seed"}
# Names for the codes (the schema has descriptions only); mirrors mlx_worker/errors.py.
ERROR_NAMES = {
    -32700: "parse_error", -32600: "invalid_request", -32601: "method_not_found",
    -32602: "invalid_params", -32603: "internal_error", -32001: "model_path_not_found",
    -32002: "load_failed", -32003: "model_not_loaded", -32004: "context_overflow",
    -32005: "out_of_memory", -32006: "busy", -32007: "constraint_invalid",
    -32008: "image_invalid", -32009: "cache_file_invalid", -32010: "shutting_down",
    -32011: "generation_failed", -32012: "cancelled",
}
# Union aliases named by property; equal variants share the first alias.
ALIAS_BY_PROPERTY = {"id": "RequestId"}
CPP_KEYWORDS = {"default", "class", "namespace", "template", "delete", "new", "operator", "union"}


def camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


class Generator:
    def __init__(self, schema: dict):
        self.schema = schema
        self.defs = schema["$defs"]
        self.aliases: dict[str, str] = {}  # C++ variant type -> alias name
        self.alias_order: list[tuple[str, str, set]] = []  # (name, type, struct deps)

    # -- types -------------------------------------------------------------
    def cpp_type(self, sch: dict, owner: str, prop: str) -> tuple[str, set]:
        """C++ type of a (non-null) schema, and the structs it needs complete."""
        if "$ref" in sch:
            name = ref_name(sch["$ref"])
            return name, {name}
        if "anyOf" in sch:
            members = [m for m in sch["anyOf"] if m.get("type") != "null"]
            if len(members) == 1:
                return self.cpp_type(members[0], owner, prop)
            return self.union(members, sch, owner, prop)
        if "enum" in sch:  # integer choices (kv_bits: 4 or 8) stay integers
            if all(isinstance(v, int) and not isinstance(v, bool) for v in sch["enum"]):
                return "std::int64_t", set()
            return "std::string", set()
        kind = sch.get("type")
        if kind == "string":
            return "std::string", set()
        if kind == "integer":
            return ("std::uint64_t" if prop in UINT64_PROPERTIES else "std::int64_t"), set()
        if kind == "number":
            return "double", set()
        if kind == "boolean":
            return "bool", set()
        if kind == "array" and isinstance(sch.get("items"), dict) and sch["items"]:
            inner, deps = self.cpp_type(sch["items"], owner, prop + "_item")
            return f"std::vector<{inner}>", deps
        if kind == "object" and isinstance(sch.get("additionalProperties"), dict) and not sch.get("properties"):
            inner, deps = self.cpp_type(sch["additionalProperties"], owner, prop + "_value")
            return f"std::map<std::string, {inner}>", deps
        return "nlohmann::json", set()

    def union(self, members: list, sch: dict, owner: str, prop: str) -> tuple[str, set]:
        flat = []
        for m in members:  # msgspec nests a tagged union inside an optional's anyOf
            if "anyOf" in m and "discriminator" in m:
                flat.extend(m["anyOf"])
            else:
                flat.append(m)
        tagged = all("$ref" in m for m in flat) and all(self.tag_of(ref_name(m["$ref"])) for m in flat)
        kinds = [self.json_kind(m) for m in flat]
        if not tagged and (None in kinds or len(set(kinds)) != len(kinds)):
            return "nlohmann::json", set()
        parts, deps = [], set()
        for m in flat:
            t, d = self.cpp_type(m, owner, prop)
            parts.append(t)
            deps |= d
        vtype = f"std::variant<{', '.join(parts)}>"
        if vtype not in self.aliases:
            if prop in ALIAS_BY_PROPERTY:
                name = ALIAS_BY_PROPERTY[prop]
            elif prop.endswith("_item"):  # a union inside an array: ChatMessage.content -> ChatMessageContentPart
                name = owner + camel(prop[: -len("_item")]) + "Part"
            else:
                name = owner + camel(prop)
            self.aliases[vtype] = name
            self.alias_order.append((name, vtype, deps))
        return self.aliases[vtype], deps

    def json_kind(self, sch: dict):
        if "$ref" in sch:
            return "object"
        if "enum" in sch and all(isinstance(v, str) for v in sch["enum"]):
            return "string"
        kind = sch.get("type")
        if kind in ("string", "boolean", "array", "object"):
            return kind
        if kind in ("integer", "number"):
            return "number"
        return None

    def tag_of(self, name: str):
        """(field, value) when the struct has a required single-value enum (a union tag)."""
        d = self.defs[name]
        for prop, sch in d.get("properties", {}).items():
            if prop in d.get("required", []) and isinstance(sch.get("enum"), list) and len(sch["enum"]) == 1:
                return prop, sch["enum"][0]
        return None

    # -- output ------------------------------------------------------------
    def fields(self, name: str):
        d = self.defs[name]
        required = set(d.get("required", []))
        out = []
        for prop, sch in sorted(d.get("properties", {}).items()):
            nullable = any(m.get("type") == "null" for m in sch.get("anyOf", []))
            t, deps = self.cpp_type(sch, name, prop)
            optional = prop not in required or nullable
            out.append((prop, t, deps, optional, sch))
        return out

    def ordered_structs(self) -> list[str]:
        order, state = [], {}

        def visit(n):
            if state.get(n) == 2:
                return
            if state.get(n) == 1:
                raise SystemExit(f"recursive struct {n}: not supported by gen_types.py")
            state[n] = 1
            for _, _, deps, _, _ in self.fields(n):
                for dep in sorted(deps):
                    visit(dep)
            state[n] = 2
            order.append(n)

        for n in sorted(self.defs):
            visit(n)
        return order

    def render(self) -> tuple[str, str]:
        s = self.schema
        structs = self.ordered_structs()
        h = [
            "// Generated by clients/cpp/tools/gen_types.py from protocol/schema.json: do not edit.",
            "// Regenerate: python clients/cpp/tools/gen_types.py",
            "#pragma once",
            "",
            "#include <cstdint>",
            "#include <map>",
            "#include <optional>",
            "#include <string>",
            "#include <variant>",
            "#include <vector>",
            "",
            "#include <nlohmann/json.hpp>",
            "",
            '#include "mlx_worker/json_variant.hpp"',
            "",
            "namespace mlx_worker {",
            "",
            f'inline constexpr const char* kProtocolVersion = "{s["protocol_version"]}";',
            "",
            "// JSON-RPC error codes the worker answers with.",
            "namespace errc {",
        ]
        codes = sorted(((int(c), t) for c, t in s["error_codes"].items()), reverse=True)
        for code, text in codes:
            h.append(f"inline constexpr int {ERROR_NAMES.get(code, f'error_{-code}')} = {code};  // {text}")
        h += ["}  // namespace errc", "",
              "// The schema's description of an error code, or nullptr for an unknown one.",
              "const char* error_code_description(int code);", ""]
        for n in structs:
            h.append(f"struct {n};")
        h.append("")
        emitted_aliases = set()
        for n in structs:
            # aliases whose members are complete by now (an inner union comes before its outer one)
            for alias, vtype, deps in self.alias_order:
                if alias not in emitted_aliases and deps <= set(structs[: structs.index(n)]):
                    h.append(f"using {alias} = {vtype};")
                    emitted_aliases.add(alias)
            d = self.defs[n]
            if d.get("description"):
                for line in d["description"].split("\n"):
                    h.append(f"// {line.strip()}".rstrip())
            h.append(f"struct {n} {{")
            tag = self.tag_of(n)
            if tag:
                h.append(f'  static constexpr const char* kTagField = "{tag[0]}";')
                h.append(f'  static constexpr const char* kTag = "{tag[1]}";')
            for prop, t, _, optional, sch in self.fields(n):
                member = prop + "_" if prop in CPP_KEYWORDS else prop
                if tag and prop == tag[0]:
                    h.append(f'  std::string {member} = "{tag[1]}";')
                elif optional:
                    default = sch.get("default")
                    note = f"  // default {json.dumps(default)}" if default not in (None, [], {}) else ""
                    h.append(f"  std::optional<{t}> {member};{note}")
                else:
                    h.append(f"  {t} {member}{{}};")
            h.append("};")
            h.append(f"void to_json(nlohmann::json& j, const {n}& v);")
            h.append(f"void from_json(const nlohmann::json& j, {n}& v);")
            h.append("")
        for alias, vtype, deps in self.alias_order:
            if alias not in emitted_aliases:
                h.append(f"using {alias} = {vtype};")
        h += ["", "// Method name and result type of each params struct.",
              "template <class Params>", "struct Method;"]
        for m, spec in sorted(s["methods"].items()):
            p, r = ref_name(spec["params"]["$ref"]), ref_name(spec["result"]["$ref"])
            h += [f"template <>", f"struct Method<{p}> {{",
                  f'  static constexpr const char* name = "{m}";', f"  using Result = {r};", "};"]
        h += ["", "// Notification names.", "namespace notification {"]
        for m in sorted(s["notifications"]):
            h.append(f'inline constexpr const char* {m} = "{m}";')
        h += ["}  // namespace notification", "", "}  // namespace mlx_worker", ""]

        c = [
            "// Generated by clients/cpp/tools/gen_types.py from protocol/schema.json: do not edit.",
            '#include "mlx_worker/protocol.hpp"',
            "",
            "namespace mlx_worker {",
            "",
            "const char* error_code_description(int code) {",
            "  switch (code) {",
        ]
        for code, text in codes:
            c.append(f"    case {code}: return {json.dumps(text)};")
        c += ["    default: return nullptr;", "  }", "}", ""]
        for n in structs:
            tag = self.tag_of(n)
            fs = self.fields(n)
            c.append(f"void to_json(nlohmann::json& j, const {n}& v) {{")
            c.append("  j = nlohmann::json::object();")
            if not fs:
                c.append("  (void)v;")
            for prop, t, _, optional, _ in fs:
                member = prop + "_" if prop in CPP_KEYWORDS else prop
                if optional and not (tag and prop == tag[0]):
                    c.append(f'  if (v.{member}) j["{prop}"] = *v.{member};')
                else:
                    c.append(f'  j["{prop}"] = v.{member};')
            c.append("}")
            c.append(f"void from_json(const nlohmann::json& j, {n}& v) {{")
            if not fs:
                c.append("  (void)j;")
                c.append("  (void)v;")
            for prop, t, _, optional, _ in fs:
                member = prop + "_" if prop in CPP_KEYWORDS else prop
                if optional and not (tag and prop == tag[0]):
                    c.append(f'  if (auto it = j.find("{prop}"); it != j.end() && !it->is_null()) '
                             f"v.{member} = it->get<{t}>();")
                    c.append(f"  else v.{member}.reset();")
                else:
                    c.append(f'  j.at("{prop}").get_to(v.{member});')
            c.append("}")
            c.append("")
        c += ["}  // namespace mlx_worker", ""]
        return "\n".join(h), "\n".join(c)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gen_types.py")
    p.add_argument("--check", action="store_true", help="exit 1 if the generated files are stale")
    args = p.parse_args(argv)
    header, source = Generator(json.loads(SCHEMA.read_text(encoding="utf-8"))).render()
    stale = [f for f, text in ((HEADER, header), (SOURCE, source))
             if not f.exists() or f.read_text(encoding="utf-8") != text]
    if args.check:
        for f in stale:
            print(f"{f.relative_to(ROOT)} is stale: run `python clients/cpp/tools/gen_types.py`",
                  file=sys.stderr)
        return 1 if stale else 0
    for f, text in ((HEADER, header), (SOURCE, source)):
        f.write_text(text, encoding="utf-8")
        print(f"wrote {f.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A stdin line -> the request it holds, or the JSON-RPC error that answers it.

Checks the envelope, the method name and the params against their Struct
(bounds included) and names the bad field. Spec: protocol/README.md § Framing,
§ Errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Union

import msgspec

from . import errors, protocol
from .transport import Oversized

# After a top-level "id" key: a whole integer or string, then `,` or `}`.
_ID_VALUE = re.compile(rb'\s*:\s*(-?\d{1,18}|"(?:[^"\\]|\\.){0,200}")\s*[,}]')


@dataclass
class Request:
    id: Any  # None for a notification
    method: str
    params: Any
    notification: bool  # no id: never answered


@dataclass
class Rejected:
    id: Any
    code: int
    message: str
    data: Any = None
    notification: bool = False  # nobody to answer: logged only


def decode(line: Union[bytes, Oversized], max_line_bytes: int) -> Union[Request, Rejected]:
    if isinstance(line, Oversized):
        return Rejected(id_at_head(line.head), errors.INVALID_REQUEST,
                        f"line of {line.size} bytes exceeds max_line_bytes ({max_line_bytes}); skipped",
                        {"max_line_bytes": max_line_bytes})
    if line.lstrip()[:1] == b"[":
        return Rejected(None, errors.INVALID_REQUEST, "JSON-RPC batches are not supported; send one request per line")
    try:
        # msgspec skips unknown keys without checking their UTF-8: check
        # the whole line, so invalid bytes are an error wherever they are.
        if not line.isascii():
            line.decode("utf-8")
        env = msgspec.json.decode(line, type=protocol.Envelope)
    except msgspec.ValidationError as exc:
        return Rejected(None, errors.INVALID_REQUEST, f"invalid request: {exc}", _field_of(exc, ""))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        return Rejected(None, errors.PARSE_ERROR, f"parse error: {exc}")
    notification = env.id is msgspec.UNSET
    rid = None if notification else env.id

    def reject(code: int, message: str, data: Any) -> Rejected:
        return Rejected(rid, code, message, data, notification)

    if env.jsonrpc != "2.0":
        return reject(errors.INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"', {"field": "jsonrpc"})
    if not isinstance(env.method, str):
        return reject(errors.INVALID_REQUEST, 'invalid request: "method" must be a string', {"field": "method"})
    types = protocol.METHODS.get(env.method)
    if types is None:
        return reject(errors.METHOD_NOT_FOUND, f"method not found: {env.method!r}", {"method": env.method})
    try:
        raw = env.params if env.params is not msgspec.UNSET else b"{}"
        params = msgspec.json.decode(raw, type=types[0])
    except msgspec.ValidationError as exc:
        message = str(exc).replace("`$", "`params")
        where = _field_of(exc, "params", raw)
        if "key" in where:
            message += f" (the key {where['key']!r})"
        return reject(errors.INVALID_PARAMS, f"invalid params: {message}", where)
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:
        return reject(errors.INVALID_PARAMS, f"invalid params: {exc}", {"field": "params"})
    return Request(rid, env.method, params, notification)


def id_at_head(head: bytes) -> Any:
    """The request's own ``id`` from the first bytes of an oversized line,
    or None. Only a key of the top-level object counts: an "id" nested in
    params (a tool call's, a schema's) must not be taken for it."""
    depth, i, n = 0, 0, len(head)
    while i < n:
        c = head[i]
        if c == 0x22:  # a string: skip it whole, escapes included
            j = i + 1
            while j < n and head[j] != 0x22:
                j += 2 if head[j] == 0x5C else 1
            if j >= n:
                return None
            if depth == 1 and head[i : j + 1] == b'"id"':
                match = _ID_VALUE.match(head, j + 1)
                if match:
                    try:
                        return msgspec.json.decode(match.group(1))
                    except (msgspec.DecodeError, UnicodeDecodeError):
                        return None
            i = j + 1
            continue
        if c in (0x5B, 0x7B):
            depth += 1
        elif c in (0x5D, 0x7D):
            depth -= 1
        i += 1
    return None


def _field_of(exc: msgspec.ValidationError, root: str, raw: bytes = b"") -> dict:
    # msgspec says "... - at `$.a.b[0]`" (or "at `key` in `$.a`" for a
    # mapping's key); hosts get it as "params.a.b[0]". An unknown field, a
    # missing one and a bad mapping key are named themselves
    # ("params.max_tokenz", "params.model", "params.logit_bias.1_0"), so a
    # host sees exactly what it got wrong.
    text = str(exc)
    match = re.search(r"`\$([^`]*)`$", text)
    path = match.group(1) if match else ""
    unknown = re.match(r"Object (?:contains unknown|missing required) field `([^`]*)`", text)
    if unknown:
        path += "." + unknown.group(1)
    elif path.endswith("[...]"):  # a mapping's value: msgspec names no key; the mapping is the field
        path = path[: -len("[...]")]
    elif " - at `key` in `$" in text:
        key = _bad_key(raw, path, text)
        if key is not None:
            return {"field": f"{root}{path}.{key}", "key": key}
    return {"field": root + path if root else path.lstrip(".")}


def _bad_key(raw: bytes, path: str, message: str) -> Optional[str]:
    """The first key of the mapping at ``path`` that breaks the pattern
    msgspec reports (its error names the mapping, not the key)."""
    pattern = re.search(r"matching regex '([^']*)'", message)
    try:
        mapping = msgspec.json.decode(raw)
        for part in filter(None, path.split(".")):
            mapping = mapping[part]
    except (msgspec.DecodeError, KeyError, TypeError):
        return None
    if not isinstance(mapping, dict) or pattern is None:
        return None
    return next((k for k in mapping if not re.search(pattern.group(1), k)), None)

"""Shared by the constrained-generation tests: JSON validation with formats,
and logit biases that make a random model finish structures sooner."""

from __future__ import annotations

import datetime
import functools
import json
import re
from pathlib import Path

import jsonschema

ENGINES = ("llguidance", "outlines")

_RFC3339_TIME = re.compile(r"(\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-](\d{2}):(\d{2}))")


def _time_ok(text: str) -> bool:
    m = _RFC3339_TIME.fullmatch(text)
    if not m:
        return False
    hour, minute, second = int(m[1]), int(m[2]), int(m[3])
    offset_ok = m[6] is None or (int(m[6]) <= 23 and int(m[7]) <= 59)
    return hour <= 23 and minute <= 59 and second <= 60 and offset_ok  # 60: leap second


def _date_ok(text: str) -> bool:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text, re.ASCII):
        return False
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _date_time_ok(text: str) -> bool:
    date, sep, time = text[:10], text[10:11], text[11:]
    return sep in ("T", "t") and _date_ok(date) and _time_ok(time)


def format_checker() -> jsonschema.FormatChecker:
    """jsonschema's checker, plus RFC 3339 date-time and time (jsonschema
    checks those only with an optional package installed)."""
    checker = jsonschema.FormatChecker()
    checker.checks("date-time")(lambda v: not isinstance(v, str) or _date_time_ok(v))
    checker.checks("time")(lambda v: not isinstance(v, str) or _time_ok(v))
    checker.checks("date")(lambda v: not isinstance(v, str) or _date_ok(v))
    return checker


def validate(schema, text: str) -> object:
    """Parse ``text`` as JSON and validate it; raises on any failure."""
    value = json.loads(text)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls(schema, format_checker=format_checker()).validate(value)
    return value


@functools.lru_cache(maxsize=4)
def token_texts(model_path: str) -> tuple[str, ...]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
    return tuple(tok.decode([i], skip_special_tokens=False) for i in range(tok.get_vocab_size()))


def closing_bias(model_path: str, eos_ids=(0, 2), amount: float = 4.0) -> dict[str, float]:
    """logit_bias favouring tokens that close strings, objects and arrays
    (and EOS): a random model then finishes most structures within a few
    dozen tokens. The constraint still decides what is allowed."""
    ends = ('"', "}", "]", ",", "@", ".")
    bias = {str(i): amount for i, t in enumerate(token_texts(model_path)) if t.rstrip().endswith(ends)}
    bias.update({str(e): amount for e in eos_ids})
    return bias

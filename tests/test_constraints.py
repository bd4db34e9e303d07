"""Constrained generation through a real worker: regex, choice, Lark grammars,
JSON schemas, errors, and how constraints combine with the rest of generate.

The model is random: what is asserted is that outputs obey the constraint,
whatever the model would rather do (temperature 5, a logit_bias pushing a
forbidden token hard).
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import logprob_entries
from constraint_helpers import ENGINES, closing_bias, token_texts, validate
from mlx_worker import protocol
from mlx_worker.client import RpcError

CONSTRAINT_INVALID = -32007


def gen(worker, constraint, **params):
    params.setdefault("prompt", "Answer:")
    params.setdefault("max_tokens", 48)
    stream = worker.generate(model_id="tiny", constraint=constraint, **params)
    events = [e for e in stream if isinstance(e, protocol.TokenEvent)]
    return stream.result, events


def ids_where(model_path, predicate):
    return [i for i, t in enumerate(token_texts(model_path)) if predicate(t)]


# ------------------------------------------------------------------- regex

REGEXES = [
    r"[0-9]{3}-[a-z]{2,5}",
    r"(yes|no|maybe)",
    r"[A-Z][a-z]{1,6}( [A-Z][a-z]{1,6}){0,2}",
    r"-?(0|[1-9][0-9]{0,3})\.[0-9]{2}",
    r"^(ab)+c$",  # outer anchors are accepted; both engines match the whole output
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_outputs_fully_match(worker, engine, pattern):
    full = pattern.strip("^$")
    for seed in range(3):
        result, events = gen(worker, {"type": "regex", "pattern": pattern, "engine": engine}, seed=seed)
        assert result.stop_reason == "eos", result
        assert re.fullmatch(full, result.text), (seed, result.text)
        assert result.constraint_complete is True
        assert "".join(e.text for e in events) == result.text


def test_engines_agree_on_masks(worker):
    """Same regex, same seed: both engines allow the same tokens at every
    step, so they sample the same output."""
    constraint = {"type": "regex", "pattern": r"[a-z]{4,9}"}
    for seed in range(3):
        a, _ = gen(worker, {**constraint, "engine": "llguidance"}, seed=seed)
        b, _ = gen(worker, {**constraint, "engine": "outlines"}, seed=seed)
        assert a.tokens == b.tokens


# ------------------------------------------------------------------ choice

OPTIONS = ["a", "ab", "abc", "caf\u00e9 \u2713", 'quo"te', "back\\slash", "{json: 1}", "x-y z", ""]


@pytest.mark.parametrize("engine", ENGINES)
def test_choice_outputs_exactly_one_option(worker, engine):
    seen = set()
    for seed in range(12):
        result, _ = gen(worker, {"type": "choice", "options": OPTIONS, "engine": engine}, seed=seed)
        assert result.stop_reason == "eos"
        assert result.text in OPTIONS, result.text
        seen.add(result.text)
    assert len(seen) >= 3  # the model picks among them; nothing forces one


@pytest.mark.parametrize("engine", ENGINES)
def test_choice_longer_option_stays_reachable(worker, engine):
    """With "ab" listed before "abc", "abc" must still be producible: EOS is
    pushed down hard, so after "ab" the model has to continue."""
    eos_down = {"0": -50.0, "2": -50.0}
    result, _ = gen(worker, {"type": "choice", "options": ["ab", "abc"], "engine": engine},
                    seed=0, logit_bias=eos_down, temperature=0)
    assert result.text == "abc"


# -------------------------------------------------------------------- lark

ARITH = r"""
start: expr
expr: term (OP term)*
term: NUMBER | "(" expr ")"
OP: "+" | "-" | "*"
NUMBER: /[0-9]{1,3}/
"""


def parse_arith(text: str) -> bool:
    """A recursive-descent recognizer for ARITH."""
    pos = 0

    def number() -> bool:
        nonlocal pos
        m = re.match(r"[0-9]{1,3}", text[pos:])
        if not m:
            return False
        pos += m.end()
        return True

    def term() -> bool:
        nonlocal pos
        if text.startswith("(", pos):
            pos += 1
            if not expr() or not text.startswith(")", pos):
                return False
            pos += 1
            return True
        return number()

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while pos < len(text) and text[pos] in "+-*":
            pos += 1
            if not term():
                return False
        return True

    return expr() and pos == len(text)


def test_lark_grammar_is_obeyed(worker, tiny_model):
    bias = {str(i): 3.0 for i in ids_where(tiny_model, lambda t: t.endswith(")"))}
    bias.update({"0": 3.0, "2": 3.0})
    done = 0
    for seed in range(8):
        result, _ = gen(worker, {"type": "grammar", "lark": ARITH}, seed=seed, max_tokens=40, logit_bias=bias)
        if result.stop_reason == "eos":
            done += 1
            assert parse_arith(result.text), result.text
            assert result.constraint_complete is True
        else:
            assert result.stop_reason == "max_tokens"
    assert done >= 4


def test_outlines_refuses_lark(worker):
    with pytest.raises(RpcError) as err:
        gen(worker, {"type": "grammar", "lark": ARITH, "engine": "outlines"})
    assert err.value.code == CONSTRAINT_INVALID
    assert "Lark" in err.value.message and err.value.data["field"] == "params.constraint.lark"


# ------------------------------------------------------------- JSON schema

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "email": {"type": "string", "format": "email"},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("engine", ENGINES)
def test_json_schema_outputs_validate(worker, tiny_model, engine):
    bias = closing_bias(tiny_model)
    done = 0
    for seed in range(6):
        result, _ = gen(worker, {"type": "json_schema", "schema": PERSON, "engine": engine},
                        seed=seed, max_tokens=64, logit_bias=bias)
        if result.stop_reason == "eos":
            done += 1
            validate(PERSON, result.text)
    assert done >= 3


def test_json_whitespace_is_tight(worker, tiny_model):
    """Whitespace is the model's to choose only where an engine allows one
    space; pushing the space token hard can't make it pad."""
    space = ids_where(tiny_model, lambda t: t.strip() == "" and t != "")
    bias = {str(i): 30.0 for i in space}
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "array", "items": {"type": "null"}, "maxItems": 2}},
              "required": ["a", "b"]}
    for engine in ENGINES:
        result, _ = gen(worker, {"type": "json_schema", "schema": schema, "engine": engine},
                        seed=1, max_tokens=40, logit_bias=bias)
        assert result.stop_reason == "eos", (engine, result.text)
        value = validate(schema, result.text)
        assert len(result.text) <= len(json.dumps(value)) + 2 * result.text.count(",") + 6  # <= one space per gap
        assert "   " not in result.text  # outlines allows "[ ]?" on both sides of an empty array


def test_integer_bounds_hold_under_pressure(worker, tiny_model):
    """llguidance enforces minimum/maximum even when digits are pushed."""
    nines = ids_where(tiny_model, lambda t: t.isdigit() and "9" in t)
    bias = {str(i): 20.0 for i in nines}
    schema = {"type": "integer", "minimum": -20, "maximum": 250}
    for seed in range(5):
        result, _ = gen(worker, {"type": "json_schema", "schema": schema}, seed=seed, temperature=5.0, logit_bias=bias)
        assert result.stop_reason == "eos"
        assert -20 <= json.loads(result.text) <= 250


# ------------------------------------------------------- can't escape, EOS


@pytest.mark.parametrize("engine", ENGINES)
def test_random_model_cannot_escape(worker, tiny_model, engine):
    letters = ids_where(tiny_model, lambda t: t.isalpha())
    bias = {str(i): 100.0 for i in letters[:50]}  # forbidden by the regex, pushed hard
    for seed in range(4):
        for temperature in (0.0, 1.0, 5.0):
            result, _ = gen(worker, {"type": "regex", "pattern": "[0-9]{2,6}", "engine": engine},
                            seed=seed, temperature=temperature, logit_bias=bias, top_p=0.9)
            assert re.fullmatch("[0-9]{2,6}", result.text), result.text
            assert result.stop_reason == "eos"


@pytest.mark.parametrize("engine", ENGINES)
def test_eos_only_when_complete(worker, engine):
    """EOS pushed to +100 still can't end the output before the constraint
    is satisfied; once it is, EOS wins at once."""
    bias = {"0": 100.0, "2": 100.0}
    result, _ = gen(worker, {"type": "regex", "pattern": "[a-z]{5}", "engine": engine}, seed=3, logit_bias=bias)
    assert re.fullmatch("[a-z]{5}", result.text)
    assert result.stop_reason == "eos" and result.constraint_complete is True


def test_ignore_eos_does_not_override_a_constraint(worker):
    result, _ = gen(worker, {"type": "choice", "options": ["one", "two"]}, ignore_eos=True, max_tokens=30)
    assert result.text in ("one", "two") and result.stop_reason == "eos"


@pytest.mark.parametrize("engine", ENGINES)
def test_max_tokens_mid_structure_says_incomplete(worker, engine):
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 20}},
              "required": ["items"]}
    result, _ = gen(worker, {"type": "json_schema", "schema": schema, "engine": engine}, max_tokens=6, seed=0)
    assert result.stop_reason == "max_tokens"
    assert result.constraint_complete is False
    assert len(result.tokens) == 6
    with pytest.raises(ValueError):
        json.loads(result.text)


def test_unconstrained_result_has_no_constraint_field(worker):
    result, _ = gen(worker, None, max_tokens=3)
    assert result.constraint_complete is protocol.UNSET


# ------------------------------------------------------------------ errors

INVALID = [
    ({"type": "json_schema", "schema": {"type": "foo"}}, "params.constraint.schema"),
    ({"type": "json_schema", "schema": {"type": "integer", "minimum": "3"}}, "params.constraint.schema"),
    ({"type": "json_schema", "schema": {"$ref": "#/$defs/missing"}}, "params.constraint.schema"),
    ({"type": "json_schema", "schema": 5}, "params.constraint.schema"),
    ({"type": "json_schema", "schema": False}, "params.constraint.schema"),
    ({"type": "json_schema", "schema": {"type": "string", "minLength": 5, "maxLength": 2}}, "params.constraint.schema"),
    ({"type": "regex", "pattern": "("}, "params.constraint.pattern"),
    ({"type": "regex", "pattern": "a{3,1}"}, "params.constraint.pattern"),
    ({"type": "choice", "options": []}, "params.constraint.options"),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("constraint,field", INVALID)
def test_invalid_constraint_is_refused_before_any_token(worker, engine, constraint, field):
    stream = worker.generate(model_id="tiny", prompt="x", max_tokens=8, constraint={**constraint, "engine": engine})
    events = []
    with pytest.raises(RpcError) as err:
        for e in stream:
            events.append(e)
    assert err.value.code == CONSTRAINT_INVALID, err.value
    assert err.value.data["field"].startswith(field), err.value.data
    assert not [e for e in events if isinstance(e, protocol.TokenEvent)]
    # the worker keeps serving
    assert gen(worker, {"type": "choice", "options": ["ok"]})[0].text == "ok"


def test_bad_lark_grammar_is_refused(worker):
    with pytest.raises(RpcError) as err:
        gen(worker, {"type": "grammar", "lark": "start: undefined_rule"})
    assert err.value.code == CONSTRAINT_INVALID and err.value.data["field"] == "params.constraint.lark"


def test_unsupported_feature_names_it(worker):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}}
    with pytest.raises(RpcError) as err:
        gen(worker, {"type": "json_schema", "schema": schema, "engine": "outlines"})
    assert err.value.code == CONSTRAINT_INVALID
    assert "minimum" in err.value.message and err.value.data["at"] == "#/properties/n"
    with pytest.raises(RpcError) as err:
        gen(worker, {"type": "json_schema", "schema": {"not": {"type": "null"}}})
    assert err.value.code == CONSTRAINT_INVALID and "not" in err.value.message


def test_unknown_constraint_type_is_invalid_params(worker):
    with pytest.raises(RpcError) as err:
        gen(worker, {"type": "xml", "schema": {}})
    assert err.value.code == -32602


def test_matcher_failure_mid_generation_ends_with_an_error(worker):
    """A grammar so ambiguous that llguidance gives up after some tokens:
    the request ends with -32007, it does not continue unconstrained."""
    lark = 'start: x\nx: x x | x x x | "a" | "b" | "c" | /[a-z]/'
    stream = worker.generate(model_id="tiny", prompt="x", max_tokens=200, seed=0,
                             constraint={"type": "grammar", "lark": lark})
    tokens = []
    with pytest.raises(RpcError) as err:
        for e in stream:
            if isinstance(e, protocol.TokenEvent):
                tokens.extend(e.tokens)
    assert err.value.code == CONSTRAINT_INVALID
    assert err.value.data["phase"] == "generation"
    assert err.value.data["completion_tokens"] >= len(tokens) > 0
    assert re.fullmatch("[a-z]*", worker.detokenize(tokens, model_id="tiny"))
    assert gen(worker, {"type": "choice", "options": ["still here"]})[0].text == "still here"


# ------------------------------------------- together with the rest of generate


def test_stop_string_cuts_a_constrained_output(worker):
    result, _ = gen(worker, {"type": "regex", "pattern": "[a-z]{3}-[a-z]{3}"}, stop="-", seed=2)
    assert result.stop_reason == "stop_string" and result.stop_string == "-"
    assert re.fullmatch("[a-z]{3}", result.text)
    assert result.constraint_complete is False


def test_top_logprobs_list_only_allowed_tokens(worker, tiny_model):
    texts = token_texts(tiny_model)
    result, events = gen(worker, {"type": "regex", "pattern": "[0-9]{4}"}, top_logprobs=5, seed=1)
    assert re.fullmatch("[0-9]{4}", result.text)
    entries = logprob_entries(events)
    assert len(entries) == len(result.tokens)
    for entry in entries:
        assert entry.top and all(t.logprob > float("-inf") for t in entry.top)
        assert all(texts[t.token].isdigit() for t in entry.top), [texts[t.token] for t in entry.top]


def test_streaming_and_messages(worker):
    messages = [{"role": "user", "content": "Give me JSON."}]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    result, events = gen(worker, {"type": "json_schema", "schema": schema}, prompt=None, messages=messages, seed=4)
    assert "".join(e.text for e in events) == result.text
    assert [t for e in events for t in e.tokens] == result.tokens
    assert json.loads(result.text) in ({"ok": True}, {"ok": False})


def test_same_seed_same_output_with_prompt_cache(worker):
    """A repeated prompt may be served from the prompt cache: the processor
    must see the same context and produce the same output."""
    constraint = {"type": "json_schema", "schema": {"type": "array", "items": {"type": "integer"}, "maxItems": 4}}
    prompt = "A long shared prefix for the cache. " * 6
    a, _ = gen(worker, constraint, prompt=prompt, seed=9, prompt_cache=True)
    b, _ = gen(worker, constraint, prompt=prompt, seed=9, prompt_cache=True)
    c, _ = gen(worker, constraint, prompt=prompt, seed=9, prompt_cache=False)
    assert a.tokens == b.tokens == c.tokens
    assert b.usage.cached_tokens > 0 and c.usage.cached_tokens == 0
    validate(constraint["schema"], b.text)


def test_cancel_a_constrained_generation(worker):
    constraint = {"type": "json_schema", "schema": {"type": "array", "items": {"type": "string"}, "minItems": 500}}
    stream = worker.generate(model_id="tiny", prompt="x", max_tokens=2000, constraint=constraint)
    for event in stream:
        if isinstance(event, protocol.TokenEvent):
            assert stream.cancel() is True
            break
    result = stream.wait()
    assert result.stop_reason == "cancelled"
    assert result.constraint_complete is False

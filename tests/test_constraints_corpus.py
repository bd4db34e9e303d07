"""The JSON-schema corpus through both engines, at temperature 1.0 with
several seeds. Every schema an engine doesn't refuse (REFUSED lists, with
the expected message, each one it does) must yield outputs that, when they
end by EOS, parse and validate with jsonschema (formats checked). Outputs
cut by max_tokens must say constraint_complete: false unless they validate.
"""

from __future__ import annotations

import pytest

from conftest import spawn
from constraint_helpers import ENGINES, closing_bias, validate
from mlx_worker.client import RpcError
from schema_corpus import REFUSED, SCHEMAS

SEEDS = (0, 1, 2, 3)
MAX_TOKENS = 56


@pytest.fixture(scope="module")
def corpus_worker(tiny_model):
    w = spawn()
    w.load(tiny_model, model_id="tiny")
    yield w
    w.close()


def test_corpus_covers_the_features():
    assert len(SCHEMAS) >= 60
    text = repr(SCHEMAS)
    for keyword in ("anyOf", "oneOf", "allOf", "$ref", "$defs", "enum", "const", "pattern", "minItems",
                    "maxItems", "minLength", "maxLength", "minimum", "maximum", "additionalProperties",
                    "required", "'date'", "'date-time'", "'email'", "'uuid'"):
        assert keyword in text, keyword
    for engine in ENGINES:
        assert set(REFUSED[engine]) <= set(SCHEMAS)


@pytest.mark.parametrize("engine", ENGINES)
def test_schema_corpus(corpus_worker, tiny_model, engine):
    bias = closing_bias(tiny_model)
    refused, completed, cut = [], 0, 0
    for name, schema in SCHEMAS.items():
        constraint = {"type": "json_schema", "schema": schema, "engine": engine}
        expected = REFUSED[engine].get(name)
        for seed in SEEDS:
            try:
                result = corpus_worker.generate(model_id="tiny", prompt="JSON:", max_tokens=MAX_TOKENS, seed=seed,
                                                temperature=1.0, logit_bias=bias, constraint=constraint).wait()
            except RpcError as err:
                assert expected is not None, f"{name}: unexpected refusal: {err.message}"
                assert err.code == -32007 and expected in err.message, (name, err.message)
                refused.append(name)
                break
            assert expected is None, f"{name}: expected a refusal mentioning {expected!r}"
            if result.stop_reason == "eos":
                completed += 1
                assert result.constraint_complete is True
                try:
                    validate(schema, result.text)
                except Exception as exc:
                    pytest.fail(f"{engine} {name} seed {seed}: {result.text!r}: {exc}")
            else:
                assert result.stop_reason == "max_tokens"
                cut += 1
                if result.constraint_complete:
                    validate(schema, result.text)
    assert sorted(refused) == sorted(REFUSED[engine])
    # Most runs must finish, or the validation above would prove little.
    assert completed >= 4 * cut, (completed, cut)

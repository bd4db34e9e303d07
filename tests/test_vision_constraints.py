"""Constrained generation with an image in the prompt."""

from __future__ import annotations

import json

import jsonschema
import pytest

from conftest import spawn
from constraint_helpers import ENGINES
from fixtures.build import ensure_model
from vision_images import b64, gradient, noise, png, user

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"enum": [0, 1, 2, 3]},
        "sure": {"type": "boolean"},
    },
    "required": ["colour", "count", "sure"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def vw():
    w = spawn()
    w.load(str(ensure_model("tiny-qwen2-vl")), model_id="vlm")
    yield w
    w.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_json_schema_with_an_image(vw, engine):
    for image in (noise(41), gradient((224, 224))):
        msgs = user("Which colour, and how many?", ("image", b64(png(image))))
        for seed in range(2):
            result = vw.generate(
                model_id="vlm", messages=msgs, max_tokens=60, temperature=1.5, seed=seed,
                constraint={"type": "json_schema", "schema": SCHEMA, "engine": engine},
            ).wait()
            assert result.stop_reason == "eos", result
            jsonschema.validate(json.loads(result.text), SCHEMA)
            # Again, from the prompt cache: the constraint sees the same context.
            again = vw.generate(
                model_id="vlm", messages=msgs, max_tokens=60, temperature=1.5, seed=seed,
                constraint={"type": "json_schema", "schema": SCHEMA, "engine": engine},
            ).wait()
            assert again.usage.cached_tokens > 64 and again.tokens == result.tokens

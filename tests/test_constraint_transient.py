"""A constraint that failed to compile for a transient reason (memory ran
out) is compiled again next time; only a genuine refusal is remembered.

The fault is injected into the worker process at start-up by a
``sitecustomize`` module: jsonschema's ``validator_for`` (which the worker
calls while compiling a JSON schema) raises MemoryError once, for a schema
whose title asks for it, and notes every call for a titled schema in a file,
so the test sees when a schema was compiled and when the cache answered.
"""

from __future__ import annotations

import json
import re
import os
import textwrap

import pytest

from mlx_worker.client import RpcError
from tests.conftest import spawn, worker_env

SCHEMA = {"title": "oom-once", "type": "object", "properties": {"n": {"type": "integer"}},
          "required": ["n"], "additionalProperties": False}


@pytest.fixture
def oom_once_worker(tmp_path, tiny_model):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import os
        from jsonschema import validators
        original = validators.validator_for
        fired = []
        def validator_for(schema, *args, **kwargs):
            if isinstance(schema, dict) and schema.get("title") in ("oom-once", "typo"):
                with open(os.environ["COMPILE_LOG"], "a") as log:
                    log.write(schema["title"] + "\\n")
            if isinstance(schema, dict) and schema.get("title") == "oom-once" and not fired:
                fired.append(True)
                raise MemoryError("injected: out of memory while compiling")
            return original(schema, *args, **kwargs)
        validators.validator_for = validator_for
    """))
    env = worker_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{worker_env()['PYTHONPATH']}",
                     COMPILE_LOG=str(tmp_path / "compiles.log"))
    w = spawn(env=env)
    w.load(tiny_model, model_id="tiny")
    w.compiles = lambda: (tmp_path / "compiles.log").read_text().split() if (tmp_path / "compiles.log").exists() else []
    yield w
    w.close()


@pytest.mark.parametrize("engine", ["llguidance", "outlines"])
def test_transient_compile_failure_is_not_cached(oom_once_worker, engine):
    constraint = {"type": "json_schema", "schema": SCHEMA, "engine": engine}
    with pytest.raises(RpcError) as err:
        oom_once_worker.generate(model_id="tiny", prompt="n:", max_tokens=16, constraint=constraint).wait()
    assert err.value.code == -32005  # out of memory, not "constraint invalid"
    # The same schema again: compiled now, and the output obeys it.
    result = oom_once_worker.generate(model_id="tiny", prompt="n:", max_tokens=16, temperature=0,
                                      constraint=constraint).wait()
    if result.stop_reason == "eos":
        assert isinstance(json.loads(result.text)["n"], int)
    assert re.match(r'\{ ?"n" ?: ?-?[0-9]', result.text), result.text
    assert oom_once_worker.compiles() == ["oom-once", "oom-once"]


def test_genuine_refusal_is_cached(oom_once_worker):
    bad = {"type": "json_schema", "schema": {"title": "typo", "type": "object", "minimum": "3"}}
    for _ in range(2):
        with pytest.raises(RpcError) as err:
            oom_once_worker.generate(model_id="tiny", prompt="x", max_tokens=4, constraint=bad).wait()
        assert err.value.code == -32007 and err.value.data["field"] == "params.constraint.schema"
    assert oom_once_worker.compiles() == ["typo"]  # the second answer came from the cache

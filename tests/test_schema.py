"""protocol/schema.json is generated from the Structs and must be current."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import pytest

from conftest import ROOT
from mlx_worker import protocol, schema


def test_schema_file_is_current():
    current = (ROOT / "protocol" / "schema.json").read_text(encoding="utf-8")
    assert current == schema.render(), "protocol/schema.json is stale: run `python -m mlx_worker.schema`"


def test_schema_covers_every_method_and_event():
    doc = json.loads(schema.render())
    assert set(doc["methods"]) == set(protocol.METHODS)
    assert set(doc["notifications"]) == set(protocol.EVENTS)
    jsonschema.Draft202012Validator.check_schema(doc)


def test_real_traffic_validates_against_the_schema(worker):
    """Results and events from a real generate validate against schema.json."""
    doc = json.loads((ROOT / "protocol" / "schema.json").read_text())

    def validator(ref):
        return jsonschema.Draft202012Validator({**ref, "$defs": doc["$defs"]})

    stream = worker.generate(model_id="tiny", prompt="schema", max_tokens=5, top_logprobs=2, seed=1)
    stream.wait()
    start = len(worker.lines)
    status = worker.call("status", {})
    validator(doc["methods"]["status"]["result"]).validate(status)
    for line in worker.lines[:start]:
        msg = json.loads(line)
        if msg.get("method") in doc["notifications"]:
            validator(doc["notifications"][msg["method"]]["params"]).validate(msg["params"])
        elif "result" in msg and "stop_reason" in msg["result"]:
            validator(doc["methods"]["generate"]["result"]).validate(msg["result"])
        elif "error" in msg:
            validator(doc["error"]).validate(msg["error"])


MSGSPEC_VERSIONS = ("0.22.0", "0.23.0")  # 0.22 kept docstring indentation in descriptions, 0.23 dedents


@pytest.mark.timeout(240)  # two wheels from the package index
def test_schema_is_the_same_under_every_msgspec(tmp_path):
    """The committed schema.json is what the generator writes under msgspec 0.22.0 and 0.23.0
    alike: each version is installed into its own folder and put first on the generator's path."""
    committed = (ROOT / "protocol" / "schema.json").read_text(encoding="utf-8")
    for version in MSGSPEC_VERSIONS:
        target, out = tmp_path / version, tmp_path / f"schema-{version}.json"
        install = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary", ":all:",
             "--target", str(target), f"msgspec=={version}"],
            capture_output=True, text=True, timeout=180)
        assert install.returncode == 0, f"pip could not install msgspec=={version}:\n{install.stderr[-3000:]}"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
        run = subprocess.run(
            [sys.executable, "-c", "import msgspec, sys; from mlx_worker import schema; "
             "print(msgspec.__version__); sys.exit(schema.main(['--path', sys.argv[1]]))", str(out)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.strip() == version, f"the generator imported msgspec {run.stdout.strip()}"
        assert out.read_text(encoding="utf-8") == committed, f"msgspec {version} gives another schema.json"

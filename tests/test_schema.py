"""protocol/schema.json is generated from the Structs and must be current."""

from __future__ import annotations

import json

import jsonschema

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

"""Loading a folder that is already loaded under the same model_id.

The same options give the loaded model back (``already_loaded: true``);
other options are refused with -32602 naming the option, never ignored.
"""

from __future__ import annotations

import pytest

from mlx_worker.client import RpcError
from tests.conftest import spawn

TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"


@pytest.fixture(scope="module")
def loaded(tiny_model):
    w = spawn()
    w.load(tiny_model, model_id="t", max_kv_size=512, prompt_cache_entries=4)
    yield w
    w.close()


def test_same_options_give_the_loaded_model(loaded, tiny_model):
    again = loaded.load(tiny_model, model_id="t", max_kv_size=512, prompt_cache_entries=4)
    assert again.already_loaded is True


@pytest.mark.parametrize("option,value", [
    ("chat_template", TEMPLATE),
    ("max_kv_size", 1024),
    ("max_kv_size", None),
    ("prompt_cache_entries", 8),
    ("prompt_cache_bytes", 1 << 20),
    ("memory_limit", 1 << 30),
    ("prefill_step_size", 64),
    ("trust_remote_code", True),
])
def test_other_options_are_refused(loaded, tiny_model, option, value):
    options = {"max_kv_size": 512, "prompt_cache_entries": 4, option: value}
    with pytest.raises(RpcError) as err:
        loaded.load(tiny_model, model_id="t", **options)
    assert err.value.code == -32602
    assert err.value.data["field"] == f"params.{option}"
    assert option in err.value.message
    # The loaded model is unchanged and still serves.
    status = loaded.status().models
    assert [m.model_id for m in status] == ["t"]
    assert status[0].prompt_cache.max_entries == 4
    messages = [{"role": "user", "content": "hi"}]
    rendered = loaded.tokenize(model_id="t", messages=messages).prompt
    assert "[user]" not in rendered


def test_other_options_under_another_model_id_load(loaded, tiny_model):
    other = loaded.load(tiny_model, model_id="t2", chat_template=TEMPLATE)
    assert other.already_loaded is False
    rendered = loaded.tokenize(model_id="t2", messages=[{"role": "user", "content": "hi"}]).prompt
    assert rendered.startswith("[user] hi")
    loaded.unload("t2")

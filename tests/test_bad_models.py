"""Broken model folders: each gets a clear -32001/-32002, the worker keeps
serving, and nothing is left half-loaded (no model listed, MLX memory back
at its baseline). The broken folders are copies of the tiny-llama fixture."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import spawn
from mlx_worker.client import RpcError

MiB = 1 << 20


def _edit_json(name: str, **changes):
    def edit(d: Path) -> None:
        data = json.loads((d / name).read_text())
        for key, value in changes.items():
            if value is _DELETE:
                data.pop(key, None)
            else:
                data[key] = value
        (d / name).write_text(json.dumps(data))
    return edit


_DELETE = object()


def _truncate_weights(d: Path) -> None:
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: len(blob) // 3])


def _garbage_weights(d: Path) -> None:
    (d / "model.safetensors").write_bytes(os.urandom(50_000))


def _flip_header(d: Path) -> None:
    blob = bytearray((d / "model.safetensors").read_bytes())
    blob[8:40] = b"{" * 32  # the JSON header is no longer JSON
    (d / "model.safetensors").write_bytes(bytes(blob))


def _unlink(*names: str):
    def edit(d: Path) -> None:
        for n in names:
            (d / n).unlink()
    return edit


# name -> (how to break it, expected code, a phrase the message must contain)
BROKEN = {
    "no_weights": (_unlink("model.safetensors"), -32002, "no weights"),
    "no_tokenizer": (_unlink("tokenizer.json", "tokenizer_config.json"), -32002, "no tokenizer"),
    "no_config": (_unlink("config.json"), -32002, "config.json not found"),
    "truncated_weights": (_truncate_weights, -32002, "model.safetensors is corrupt or incomplete"),
    "garbage_weights": (_garbage_weights, -32002, "model.safetensors is corrupt or incomplete"),
    "corrupt_header": (_flip_header, -32002, "model.safetensors is corrupt or incomplete"),
    "config_not_json": (lambda d: (d / "config.json").write_text("{'not': json"), -32002, "not valid JSON"),
    "config_is_a_list": (lambda d: (d / "config.json").write_text("[1, 2]"), -32002, "not a JSON object"),
    "hidden_size_string": (_edit_json("config.json", hidden_size="big"), -32002, "hidden_size"),
    "layers_null": (_edit_json("config.json", num_hidden_layers=None), -32002, "num_hidden_layers"),
    "heads_zero": (_edit_json("config.json", num_attention_heads=0), -32002, "num_attention_heads"),
    "vocab_bool": (_edit_json("config.json", vocab_size=True), -32002, "vocab_size"),
    "vocab_mismatch": (_edit_json("config.json", vocab_size=2048), -32002, "could not load"),
    "eos_string": (_edit_json("config.json", eos_token_id="x"), -32002, "eos_token_id"),
    "unknown_model_type": (_edit_json("config.json", model_type="no_such_arch"), -32002, "no_such_arch not supported"),
    "no_model_type": (_edit_json("config.json", model_type=_DELETE), -32002, "model_type"),
    "tokenizer_corrupt": (lambda d: (d / "tokenizer.json").write_text("{bad"), -32002, "tokenizer.json"),
}


@pytest.fixture(scope="module")
def bare_worker():
    w = spawn()
    w.baseline = w.status().memory
    yield w
    w.close()


def broken_copy(tiny_model: str, tmp_path: Path, name: str, edit) -> Path:
    d = tmp_path / name
    shutil.copytree(tiny_model, d)
    edit(d)
    return d


def assert_nothing_loaded(w) -> None:
    status = w.status()
    assert status.models == []
    assert status.memory.active <= w.baseline.active + MiB, status.memory
    assert status.memory.cache == 0, status.memory


def test_missing_folder(bare_worker, tmp_path):
    with pytest.raises(RpcError) as e:
        bare_worker.load(str(tmp_path / "does-not-exist"))
    assert e.value.code == -32001
    assert e.value.data["field"] == "params.model"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RpcError) as e:
        bare_worker.load(str(a_file))
    assert e.value.code == -32001 and "not a folder" in e.value.message
    assert_nothing_loaded(bare_worker)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_folder(bare_worker, tiny_model, tmp_path, name):
    edit, code, phrase = BROKEN[name]
    folder = broken_copy(tiny_model, tmp_path, name, edit)
    with pytest.raises(RpcError) as e:
        bare_worker.load(str(folder))
    assert e.value.code == code, e.value
    assert phrase in e.value.message, e.value.message
    assert e.value.data["path"] == str(folder)
    assert "Traceback" not in e.value.message
    assert_nothing_loaded(bare_worker)


def _plant_marker_code(d: Path, filename: str, body: str) -> Path:
    """Python in the model folder that leaves a file behind if it ever runs."""
    marker = d.parent / f"{d.name}-RAN"
    (d / filename).write_text(f"open({str(marker)!r}, 'w').write('ran')\n{body}")
    return marker


REMOTE = {
    # mlx-lm and mlx-vlm import config.json's model_file to build the model
    "model_file": lambda d: (
        _plant_marker_code(d, "custom_model.py", "from mlx_lm.models.llama import Model, ModelArgs\n"),
        _edit_json("config.json", model_file="custom_model.py")(d),
    )[0],
    # transformers imports a tokenizer class named in tokenizer_config.json's auto_map
    "tokenizer_auto_map": lambda d: (
        _plant_marker_code(d, "tokenization_custom.py",
                           "from transformers import PreTrainedTokenizerFast\n"
                           "class CustomTok(PreTrainedTokenizerFast):\n    pass\n"),
        _edit_json("tokenizer_config.json", tokenizer_class="CustomTok",
                   auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTok"]})(d),
    )[0],
}


@pytest.mark.parametrize("kind", sorted(REMOTE))
def test_remote_code_is_refused_unless_the_host_opts_in(bare_worker, tiny_model, tmp_path, kind):
    folder = tmp_path / kind
    shutil.copytree(tiny_model, folder)
    marker = REMOTE[kind](folder)
    with pytest.raises(RpcError) as e:
        bare_worker.load(str(folder))
    assert e.value.code == -32002
    assert "trust_remote_code" in e.value.message
    assert e.value.data["field"] == "params.trust_remote_code"
    assert e.value.data["remote_code"]
    assert not marker.exists(), "the model's code ran without the host's consent"
    assert_nothing_loaded(bare_worker)

    result = bare_worker.load(str(folder), model_id=kind, trust_remote_code=True)
    assert marker.exists()
    out = bare_worker.generate(model_id=kind, prompt="hi", max_tokens=3, ignore_eos=True).wait()
    assert len(out.tokens) == 3
    bare_worker.unload(result.model_id)
    assert_nothing_loaded(bare_worker)


def test_pytorch_custom_architecture_explains_itself(bare_worker, tiny_model, tmp_path):
    """config.json's auto_map points at PyTorch modeling code: no flag helps."""
    folder = broken_copy(tiny_model, tmp_path, "auto_map_arch", _edit_json(
        "config.json", model_type="custom_thing",
        auto_map={"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomModel"},
    ))
    for trust in (False, True):
        with pytest.raises(RpcError) as e:
            bare_worker.load(str(folder), trust_remote_code=trust)
        assert e.value.code == -32002
        assert "custom_thing not supported" in e.value.message and "auto_map" in e.value.message
    assert_nothing_loaded(bare_worker)


def test_a_failed_load_leaves_loaded_models_alone(bare_worker, tiny_model, tmp_path):
    good = bare_worker.load(tiny_model, model_id="good")
    before = bare_worker.generate(model_id="good", prompt="abc", max_tokens=5, temperature=0, ignore_eos=True).wait()
    folder = broken_copy(tiny_model, tmp_path, "bad", _truncate_weights)
    with pytest.raises(RpcError):
        bare_worker.load(str(folder), model_id="bad")
    status = bare_worker.status()
    assert [m.model_id for m in status.models] == ["good"]
    after = bare_worker.generate(model_id="good", prompt="abc", max_tokens=5, temperature=0, ignore_eos=True).wait()
    assert after.tokens == before.tokens
    bare_worker.unload(good.model_id)
    assert_nothing_loaded(bare_worker)

"""Which tokens end a vision model's answer: the ones mlx-vlm's own generate
stops on (config.json's eos_token_id as generation_config.json overrides it,
and the tokenizer's), also when a null in text_config hides nothing."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import spawn
from fixtures.build import ensure_model
from vision_images import b64, noise, png, user

MSGS = user("What is in the picture?", ("image", b64(png(noise(11)))))


@pytest.fixture(scope="module")
def greedy():
    """The fixture's greedy answer, without any extra EOS."""
    with spawn() as w:
        w.load(str(ensure_model("tiny-qwen2-vl")), model_id="vlm")
        return w.generate(model_id="vlm", messages=MSGS, max_tokens=12, temperature=0, ignore_eos=True,
                          prompt_cache=False).wait().tokens


def variant(tmp_path, edit_config=None, generation_config=None) -> str:
    folder = tmp_path / "vlm"
    shutil.copytree(ensure_model("tiny-qwen2-vl"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return str(folder)


def first_stop(greedy) -> int:
    return next(t for t in greedy[3:] if t not in greedy[:3])


def check_stops_there(path, greedy):
    stop = first_stop(greedy)
    with spawn() as w:
        loaded = w.load(path, model_id="vlm")
        assert stop in loaded.eos_token_ids
        result = w.generate(model_id="vlm", messages=MSGS, max_tokens=12, temperature=0, prompt_cache=False).wait()
        assert result.stop_reason == "eos" and result.stop_token == stop
        assert result.tokens == greedy[: greedy.index(stop)]


def test_generation_config_eos_is_honoured(tmp_path, greedy):
    path = variant(tmp_path, generation_config={"eos_token_id": [2, first_stop(greedy)]})
    check_stops_there(path, greedy)


def test_null_in_text_config_does_not_hide_the_top_level_eos(tmp_path, greedy):
    def edit(cfg):
        cfg["text_config"] = {"eos_token_id": None}
        cfg["eos_token_id"] = [2, first_stop(greedy)]

    check_stops_there(variant(tmp_path, edit_config=edit), greedy)

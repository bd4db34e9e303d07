"""A hostile but realistic host (issue 16): special files where paths go,
edge values in every numeric field, text parts and broken templates, and work
still running when the worker is told to stop. Raw JSON over real pipes: what
a host sees is what is asserted (a `null` logprob included)."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import time

import pytest

from conftest import ROOT
from fixtures.build import ensure_model
from harness import RawWorker, error, exited_within, ok
from mlx_worker import errors
from vision_images import b64, jpg, noise, png, solid

QUICK = 15.0  # a refused path answers in milliseconds; a hang never does
GREEDY = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, "prompt_cache": False}
TRIM_TEMPLATE = (  # Gemma-style: each text part is trimmed
    "{%- for m in messages -%}<start_of_turn>{{ m['role'] }}\n"
    "{%- if m['content'] is string -%}{{ m['content'] | trim }}"
    "{%- else -%}{%- for p in m['content'] -%}{%- if p['type'] == 'text' -%}{{ p['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<end_of_turn>\n{%- endfor -%}"
    "{%- if add_generation_prompt -%}<start_of_turn>model\n{%- endif -%}"
)


@pytest.fixture(scope="session")
def vlm_path() -> str:
    return str(ensure_model("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def fp16_model(tmp_path_factory, tiny_model) -> str:
    """tiny-llama with every weight cast to float16 (float16 logits, as from
    a typical quantized checkpoint)."""
    import mlx.core as mx

    out = tmp_path_factory.mktemp("tiny-llama-fp16")
    for f in os.listdir(tiny_model):
        if f != "model.safetensors" and os.path.isfile(os.path.join(tiny_model, f)):
            shutil.copy(os.path.join(tiny_model, f), out / f)
    weights = mx.load(os.path.join(tiny_model, "model.safetensors"))
    mx.save_safetensors(str(out / "model.safetensors"), {k: v.astype(mx.float16) for k, v in weights.items()})
    return str(out)


@pytest.fixture(scope="module")
def hw(tiny_model, vlm_path, fp16_model):
    w = RawWorker()
    for path, mid in ((tiny_model, "tiny"), (vlm_path, "vlm"), (fp16_model, "fp16")):
        reply = w.call("load", {"model": path, "model_id": mid})
        assert "result" in reply, reply
    yield w
    w.close()


def serves(w: RawWorker) -> None:
    assert len(ok(w.call("generate", {"model_id": "tiny", "prompt": "Once", **GREEDY}, timeout=QUICK))["tokens"]) == 6


def image_msg(source: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image", "image": source}]}]


# ------------------------------------------------------- special files


def test_image_path_naming_a_fifo_is_refused_without_opening_it(hw, tmp_path):
    fifo = tmp_path / "picture.png"
    os.mkfifo(fifo)
    for source in (str(fifo), f"file://{fifo}"):
        reply = hw.call("generate", {"model_id": "vlm", "messages": image_msg(source), **GREEDY}, timeout=QUICK)
        err = error(reply, errors.IMAGE_INVALID)
        assert err["data"]["reason"] == "not_a_file", err
        assert err["data"]["field"] == "params.messages[0].content[1].image"
    serves(hw)


def test_image_path_reaching_the_workers_own_stdin_is_refused(vlm_path):
    w = RawWorker()
    try:
        ok(w.call("load", {"model": vlm_path, "model_id": "vlm"}))
        for source in ("/dev/stdin", "/proc/self/fd/0", "/dev/fd/0"):
            reply = w.call("tokenize", {"model_id": "vlm", "messages": image_msg(source)}, timeout=QUICK)
            assert error(reply, errors.IMAGE_INVALID)["data"]["reason"] == "not_a_file"
        # Nothing sent afterwards was swallowed.
        ok(w.call("tokenize", {"model_id": "vlm", "text": "still here"}, timeout=QUICK))
        assert ok(w.call("shutdown", id="bye", timeout=QUICK)) == {"shutting_down": True}
        assert exited_within(w.proc, 5) is not None
    finally:
        w.close()


def _model_copy(src: str, dst) -> None:
    dst.mkdir()
    for f in os.listdir(src):
        if os.path.isfile(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), dst / f)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "model.safetensors", "chat_template.jinja", "extra.bin"])
def test_model_folder_holding_a_fifo_is_refused(hw, tiny_model, tmp_path, name):
    folder = tmp_path / "model"
    _model_copy(tiny_model, folder)
    if (folder / name).exists():
        (folder / name).unlink()
    os.mkfifo(folder / name)
    err = error(hw.call("load", {"model": str(folder), "model_id": "fifo"}, timeout=QUICK), errors.LOAD_FAILED)
    assert name in err["message"], err
    serves(hw)


def test_cache_load_of_a_fifo_or_folder_is_a_cache_file_error(hw, tmp_path):
    fifo = tmp_path / "c.safetensors"
    os.mkfifo(fifo)
    (tmp_path / "d.safetensors").mkdir()
    for path in (fifo, tmp_path / "d.safetensors"):
        reply = hw.call("cache_load", {"model_id": "tiny", "path": str(path)}, timeout=QUICK)
        assert error(reply, errors.CACHE_FILE_INVALID)["data"]["path"] == str(path)
    serves(hw)


# --------------------------------------- every request read gets one answer


@pytest.mark.parametrize("how", ["shutdown", "eof"])
def test_a_running_tokenize_is_answered_before_the_exit(tiny_model, how):
    w = RawWorker()
    try:
        ok(w.call("load", {"model": tiny_model, "model_id": "tiny"}))
        t0 = time.monotonic()
        w.request("tokenize", {"model_id": "tiny", "text": "hello world, said the model " * 250_000}, id="tk")
        w.request("status", id="st")  # answered at once: the tokenize has been read
        w.response("st")
        time.sleep(0.2)
        if how == "shutdown":
            w.request("shutdown", id="bye")
        else:
            w.close_stdin()
        took = exited_within(w.proc, 10)
        assert took is not None
        w._reader.join(5)
        answers = [m for m in w.responses() if m.get("id") == "tk"]
        if not answers:
            pytest.fail(f"tokenize never answered (ran {time.monotonic() - t0:.1f} s)")
        assert len(answers) == 1, answers
        if "error" in answers[0]:
            assert answers[0]["error"]["code"] == errors.SHUTTING_DOWN
        assert took < 3.0, f"exit took {took:.2f} s after {how}"
        assert not w.bad_lines
    finally:
        w.close()


def test_a_generate_inside_a_long_prefill_chunk_gets_its_cancelled_result_before_the_exit(small_model):
    w = RawWorker()
    try:
        ok(w.call("load", {"model": small_model, "model_id": "small"}))
        prompt = [(i * 7919) % 1000 + 10 for i in range(3800)]  # one chunk: seconds of work
        w.request("generate", {"model_id": "small", "tokens": prompt, "max_tokens": 4, "prefill_step_size": 4096,
                               "prompt_cache": False}, id="g")
        w.call("status", id="st")
        time.sleep(0.3)
        assert ok(w.call("cancel", {"id": "g"}, timeout=QUICK)) == {"cancelled": True}
        w.request("shutdown", id="bye")
        took = exited_within(w.proc, 10)
        w._reader.join(5)
        answers = [m for m in w.responses() if m.get("id") == "g"]
        assert len(answers) == 1, answers
        assert answers[0]["result"]["stop_reason"] == "cancelled"  # what cancel's `true` promised
        assert took is not None and took < 3.0, took  # about a second; 3 s on a loaded 2-core box
        assert not w.bad_lines
    finally:
        w.close()


# ------------------------------------------------------------- logits


def _tokens_and_logprobs(w, model_id, **params):
    base = {"model_id": model_id, "prompt": "Once upon a time", "max_tokens": 5, "ignore_eos": True,
            "prompt_cache": False, "seed": 3, "logprobs": True, "top_logprobs": 3}
    reply = w.call("generate", {**base, **params}, timeout=60)
    result = ok(reply)
    events = [m["params"] for m in w.messages if m.get("method") == "token" and m["params"]["id"] == reply["id"]]
    entries = [e for ev in events for e in ev.get("logprobs", [])]
    return result["tokens"], entries


def _all_numbers(entries, n_top=3):
    assert entries
    for e in entries:
        assert isinstance(e["logprob"], float) and math.isfinite(e["logprob"]), e
        assert len(e["top"]) == n_top, e
        assert all(isinstance(t["logprob"], float) and math.isfinite(t["logprob"]) for t in e["top"]), e


@pytest.mark.parametrize("model_id,bias", [("fp16", 1e5), ("fp16", 1e30), ("tiny", 1e39), ("tiny", 1.7e308)])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_a_huge_logit_bias_forces_its_token(hw, model_id, bias, temperature):
    forced = 77
    tokens, entries = _tokens_and_logprobs(hw, model_id, logit_bias={str(forced): bias}, temperature=temperature)
    assert tokens == [forced] * 5
    _all_numbers(entries)
    assert all(e["top"][0]["token"] == forced for e in entries)


@pytest.mark.parametrize("model_id", ["tiny", "fp16"])
@pytest.mark.parametrize("penalty", [1e-300, 1e-30, 1e-8])
def test_a_tiny_repetition_penalty_keeps_logprobs_numbers(hw, model_id, penalty):
    tokens, entries = _tokens_and_logprobs(hw, model_id, repetition_penalty=penalty, temperature=0)
    _all_numbers(entries)
    assert tokens != [1023] * 5  # not the last id every time (what non-finite logits gave)


def test_huge_presence_and_frequency_penalties_keep_logprobs_numbers(hw):
    for model_id in ("tiny", "fp16"):
        _, entries = _tokens_and_logprobs(hw, model_id, presence_penalty=1e39, frequency_penalty=-1e39,
                                          logit_bias={"5": -1e39}, temperature=0.5)
        _all_numbers(entries)


@pytest.mark.parametrize("model_id", ["tiny", "fp16"])
def test_top_p_and_temperature_below_float_range_are_greedy(hw, model_id):
    greedy, _ = _tokens_and_logprobs(hw, model_id, temperature=0)
    for params in ({"top_p": 1e-46}, {"top_p": 5e-324}, {"top_p": 1e-30}, {"temperature": 1e-300},
                   {"temperature": 1e-6}):
        for seed in (1, 2):
            tokens, entries = _tokens_and_logprobs(hw, model_id, **{"temperature": 1.0, **params}, seed=seed)
            assert tokens == greedy, params
            _all_numbers(entries)


# ------------------------------------------------------ template inputs


def _hf_render(folder: str, messages, template=None) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


PARTS = [
    {"role": "system", "content": [{"type": "text", "text": "  Be brief. "}]},
    {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": " world"},
                                 {"type": "text", "text": ""}, {"type": "text", "text": "\n!"}]},
]


def test_text_parts_reach_the_template_as_transformers_passes_them(hw, tiny_model, vlm_path):
    ok(hw.call("load", {"model": tiny_model, "model_id": "trim", "chat_template": TRIM_TEMPLATE}))
    try:
        cases = [("trim", tiny_model, TRIM_TEMPLATE), ("tiny", tiny_model, None), ("vlm", vlm_path, None)]
        for model_id, folder, template in cases:
            rendered = ok(hw.call("tokenize", {"model_id": model_id, "messages": PARTS}))["prompt"]
            assert rendered == _hf_render(folder, PARTS, template), model_id
        assert "Helloworld!" in ok(hw.call("tokenize", {"model_id": "trim", "messages": PARTS}))["prompt"]
    finally:
        ok(hw.call("unload", {"model_id": "trim"}))


@pytest.mark.parametrize("model_id", ["tiny", "vlm"])
@pytest.mark.parametrize("method", ["generate", "cache_save"])
def test_a_template_that_renders_nothing_is_invalid_params(hw, tmp_path, model_id, method):
    params = {"model_id": model_id, "messages": [{"role": "user", "content": "hi"}],
              "chat_template_kwargs": {"chat_template": "{{ '' }}"}}
    if method == "cache_save":
        params["path"] = str(tmp_path / "c.safetensors")
    else:
        params.update(GREEDY)
    error(hw.call(method, params), errors.INVALID_PARAMS)
    serves(hw)


def test_an_unparsable_chat_template_is_refused_at_load(hw, tiny_model, tmp_path):
    broken = "{% for m in messages %}{{ m['content'] }"
    err = error(hw.call("load", {"model": tiny_model, "model_id": "bad", "chat_template": broken}),
                errors.INVALID_PARAMS)
    assert err["data"]["field"] == "params.chat_template"
    # The same in the folder: the model is refused with the reason, not at first use.
    folder = tmp_path / "model"
    _model_copy(tiny_model, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = broken
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    if (folder / "chat_template.jinja").exists():
        (folder / "chat_template.jinja").write_text(broken)
    err = error(hw.call("load", {"model": str(folder), "model_id": "bad"}), errors.LOAD_FAILED)
    assert "chat template" in err["message"]
    # ... unless the host replaces it.
    ok(hw.call("load", {"model": str(folder), "model_id": "bad", "chat_template": TRIM_TEMPLATE}))
    ok(hw.call("unload", {"model_id": "bad"}))
    assert [m["model_id"] for m in ok(hw.call("status"))["models"]] == ["tiny", "vlm", "fp16"]


# ---------------------------------------------------------- edge values


GEN = {"model_id": "tiny", "prompt": "Once", "max_tokens": 2, "prompt_cache": False}
BAD_VALUES = [
    ("generate", "max_tokens", -1), ("generate", "max_tokens", 2**63),
    ("generate", "temperature", -0.5), ("generate", "temperature", 1e300), ("generate", "temperature", 10000.5),
    ("generate", "top_p", 0), ("generate", "top_p", -1e-300), ("generate", "top_p", 1.0000001),
    ("generate", "top_k", -1), ("generate", "top_k", 1024), ("generate", "top_k", 2**32),
    ("generate", "top_k", 2**64 - 1),
    ("generate", "min_p", -0.1), ("generate", "min_p", 1.5),
    ("generate", "repetition_penalty", 0), ("generate", "repetition_penalty", -2),
    ("generate", "repetition_context_size", 0), ("generate", "repetition_context_size", 2**32),
    ("generate", "repetition_context_size", 2**64 - 1),
    ("generate", "top_logprobs", -1), ("generate", "top_logprobs", 21),
    ("generate", "seed", -1), ("generate", "seed", 2**64), ("generate", "seed", 2**70),
    ("generate", "prefill_step_size", 0), ("generate", "prefill_step_size", -3),
    ("generate", "prefill_step_size", 2**31),
    ("generate", "stop_token_ids", [-1]), ("generate", "stop_token_ids", [2**40]),
    ("generate", "stop_token_ids", [1024]), ("generate", "stop", [""]), ("generate", "stop", ""),
    ("generate", "logit_bias", {"1_0": 1}), ("generate", "logit_bias", {"\u0663": 1}),
    ("generate", "logit_bias", {"-1": 1}), ("generate", "logit_bias", {" 1": 1}),
    ("generate", "logit_bias", {"+1": 1}), ("generate", "logit_bias", {"1024": 1}),
    ("generate", "logit_bias", {"99999999999": 1}), ("generate", "logit_bias", {"": 1}),
    ("cache_save", "prefill_step_size", 0), ("cache_save", "prefill_step_size", 2**31),
    ("detokenize", "tokens", [-1]), ("detokenize", "tokens", [2**64 - 1]), ("detokenize", "tokens", [1024]),
    ("load", "prefill_step_size", 0), ("load", "prefill_step_size", -1), ("load", "prefill_step_size", 2**31),
    ("load", "max_kv_size", 0), ("load", "max_kv_size", 2**31), ("load", "max_kv_size", 2**64 - 1),
    ("load", "prompt_cache_bytes", -1), ("load", "prompt_cache_bytes", 2**63),
    ("load", "prompt_cache_entries", -1), ("load", "memory_limit", 0), ("load", "memory_limit", -1),
    ("load", "memory_limit", 2**64 - 1),
    ("load", "max_images", 0), ("load", "max_image_pixels", 0), ("load", "max_image_bytes", -1),
    ("load", "image_cache_bytes", -1),
]


def _request(method, field, value, tmp):
    if method == "generate":
        return {**GEN, field: value}
    if method == "cache_save":
        return {"model_id": "tiny", "prompt": "Once", "path": str(tmp / "c.safetensors"), field: value}
    if method == "detokenize":
        return {"model_id": "tiny", field: value}
    return {"model": "/nonexistent/model", "model_id": "edge", field: value}


@pytest.mark.parametrize("method,field,value", BAD_VALUES, ids=lambda v: repr(v)[:24])
def test_out_of_range_values_are_invalid_params_naming_the_field(hw, tmp_path, method, field, value):
    err = error(hw.call(method, _request(method, field, value, tmp_path)), errors.INVALID_PARAMS)
    assert err["data"]["field"].startswith(f"params.{field}"), err


def test_repetition_context_size_past_2_32_with_presence_penalty(hw):
    for size in (2**32, 2**64 - 1):
        params = {**GEN, "repetition_context_size": size, "presence_penalty": 0.5}
        assert error(hw.call("generate", params), errors.INVALID_PARAMS)["data"]["field"] == \
            "params.repetition_context_size"
    serves(hw)


GOOD_EDGES = [
    {"repetition_context_size": 2**31 - 1, "presence_penalty": 0.5, "frequency_penalty": -0.5,
     "repetition_penalty": 1.3},
    {"prefill_step_size": 2**31 - 1}, {"prefill_step_size": 1},
    {"top_k": 1023}, {"top_k": 1}, {"min_p": 1.0}, {"min_p": 0.0}, {"top_p": 1.0}, {"top_p": 5e-324},
    {"seed": 2**64 - 1}, {"seed": 0}, {"max_tokens": 2**63 - 1}, {"max_tokens": 0},
    {"temperature": 1e4}, {"temperature": 5e-324}, {"top_logprobs": 20, "logprobs": True},
    {"stop_token_ids": [1023]}, {"logit_bias": {"0": 1e308, "1023": -1e308, "0001": -1e308}},
    {"presence_penalty": 1.7e308}, {"frequency_penalty": -1.7e308},
]


@pytest.mark.parametrize("params", GOOD_EDGES, ids=lambda p: repr(p)[:40])
def test_values_at_the_bounds_are_served(hw, params):
    result = ok(hw.call("generate", {**GEN, "max_tokens": 2, **params}, timeout=60))
    assert result["stop_reason"] in ("max_tokens", "eos")


def test_load_bounds_at_the_edges_are_served(hw, tiny_model):
    params = {"model": tiny_model, "model_id": "edges", "prefill_step_size": 1, "max_kv_size": 2**31 - 1,
              "prompt_cache_bytes": 2**63 - 1, "prompt_cache_entries": 2**63 - 1, "memory_limit": 2**63 - 1}
    ok(hw.call("load", params))
    try:
        assert len(ok(hw.call("generate", {**GEN, "model_id": "edges", "max_tokens": 3}))["tokens"]) == 3
    finally:
        ok(hw.call("unload", {"model_id": "edges"}))


@pytest.mark.parametrize("model_id", ["tiny", "fp16"])
def test_the_largest_temperature_keeps_masked_tokens_out(hw, model_id):
    greedy, _ = _tokens_and_logprobs(hw, model_id, temperature=0)
    for params in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-30}):
        tokens, entries = _tokens_and_logprobs(hw, model_id, temperature=1e4, **params)
        assert tokens == greedy, params
        _all_numbers(entries)
    constraint = {"type": "choice", "options": ["abc", "xyz"]}
    result = ok(hw.call("generate", {"model_id": model_id, "prompt": "Once", "temperature": 1e4, "seed": 2,
                                     "constraint": constraint, "max_tokens": 20, "prompt_cache": False}))
    assert result["text"] in ("abc", "xyz") and result["constraint_complete"]


def test_vision_load_bounds_at_the_edges_are_served(hw, vlm_path, tmp_path):
    huge = 2**63 - 1
    params = {"model": vlm_path, "model_id": "vedges", "max_images": huge, "max_image_pixels": huge,
              "max_image_bytes": huge, "image_cache_bytes": huge}
    ok(hw.call("load", params))
    try:
        picture = tmp_path / "p.png"
        picture.write_bytes(png(noise(3, (64, 64))))
        for source in (str(picture), b64(picture.read_bytes())):
            result = ok(hw.call("generate", {"model_id": "vedges", "messages": image_msg(source), **GREEDY}))
            assert len(result["tokens"]) == 6
    finally:
        ok(hw.call("unload", {"model_id": "vedges"}))


def test_load_prefill_step_size_zero_or_negative_is_refused_and_later_generates_work(hw, tiny_model):
    for value in (0, -1):
        err = error(hw.call("load", {"model": tiny_model, "model_id": "p", "prefill_step_size": value}),
                    errors.INVALID_PARAMS)
        assert err["data"]["field"] == "params.prefill_step_size"
    assert "p" not in [m["model_id"] for m in ok(hw.call("status"))["models"]]
    serves(hw)


# ----------------------------------------------------------------- paths


def test_every_path_must_be_absolute_and_nul_free(hw, tmp_path, tiny_model):
    long_name = "/tmp/" + "x" * 300 + ".safetensors"
    nul = str(tmp_path / "a\x00b.safetensors")
    rel = "relative/c.safetensors"
    home = "~/c.safetensors"
    for path, code in ((nul, errors.INVALID_PARAMS), (rel, errors.INVALID_PARAMS), (home, errors.INVALID_PARAMS),
                       ("/tmp/" + "x" * 300 + "/c.safetensors", errors.INVALID_PARAMS), (long_name, errors.INVALID_PARAMS)):
        err = error(hw.call("cache_save", {"model_id": "tiny", "prompt": "Once", "path": path}), code)
        assert err["data"]["field"] == "params.path", (path, err)
    assert not list(ROOT.glob("**/c.safetensors"))  # nothing written relative to the worker's folder
    for path in (nul, rel, home):
        err = error(hw.call("cache_load", {"model_id": "tiny", "path": path}), errors.INVALID_PARAMS)
        assert err["data"]["field"] == "params.path"
    for path in (long_name, "/tmp/" + "x" * 300 + "/c.safetensors", "/tmp/" + "y" * 5000 + ".safetensors"):
        error(hw.call("cache_load", {"model_id": "tiny", "path": path}), errors.CACHE_FILE_INVALID)
    for path, reason in ((str(tmp_path / "a\x00b.png"), "invalid_path"), ("/tmp/" + "x" * 300 + ".png", "unreadable"),
                         ("file:///tmp/a%00b.png", "invalid_path"), ("cat.png", "relative_path")):
        reply = hw.call("tokenize", {"model_id": "vlm", "messages": image_msg(path)})
        assert error(reply, errors.IMAGE_INVALID)["data"]["reason"] == reason, path
    for path, code in ((tiny_model + "\x00", errors.INVALID_PARAMS), ("fixtures/models/tiny-llama", errors.INVALID_PARAMS),
                       ("~/models/tiny", errors.INVALID_PARAMS), ("/tmp/" + "m" * 300, errors.MODEL_PATH_NOT_FOUND),
                       (tiny_model + "/config.json", errors.MODEL_PATH_NOT_FOUND)):
        err = error(hw.call("load", {"model": path, "model_id": "p"}), code)
        assert err["data"]["field"] == "params.model", (path, err)
    serves(hw)


def test_cache_save_and_load_round_trip_on_an_absolute_path(hw, tmp_path):
    path = str(tmp_path / "ok.safetensors")
    ok(hw.call("cache_save", {"model_id": "tiny", "prompt": "Once upon", "path": path}))
    assert ok(hw.call("cache_load", {"model_id": "tiny", "path": path}))["path"] == path


# ---------------------------------------------------------- data URLs


def _unpadded_image() -> bytes:
    for size in range(60, 80):
        data = png(solid((10, 200, 30), (size, size)))
        if len(data) % 3:
            return data
    raise AssertionError("no PNG with a padded base64 length")


def test_unpadded_base64_is_accepted_and_a_data_url_is_never_a_path(hw):
    data = _unpadded_image()
    padded = b64(data)
    assert padded.endswith("=")
    unpadded = padded.rstrip("=")
    want = ok(hw.call("tokenize", {"model_id": "vlm", "messages": image_msg(padded)}))["tokens"]
    for source in (f"data:image/png;base64,{unpadded}", unpadded,
                   f"data:image/png;base64,{base64.urlsafe_b64encode(data).decode().rstrip('=')}"):
        assert ok(hw.call("tokenize", {"model_id": "vlm", "messages": image_msg(source)}))["tokens"] == want
    jpeg = jpg(noise(5, (64, 64)))
    text = b64(jpeg).rstrip("=")
    assert text.startswith("/9j/")  # looks like an absolute path
    ok(hw.call("tokenize", {"model_id": "vlm", "messages": image_msg(f"data:image/jpeg;base64,{text}")}))
    for bad in ("data:image/png;base64,./cat.png", "data:image/png;base64,/tmp/cat.png", "data:image/png;base64,a"):
        reply = hw.call("tokenize", {"model_id": "vlm", "messages": image_msg(bad)})
        err = error(reply, errors.IMAGE_INVALID)
        assert err["data"]["reason"] == "not_base64" and "path" not in err["message"], err

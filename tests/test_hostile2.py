"""A hostile host, round 2 (issue 25): templates that never finish, huge
prompts, poisoned cache files, config files that lie, tool schemas that
aren't objects. Raw JSON over real pipes; after each attack the worker
answers every request exactly once and keeps serving, and no input gets
-32603."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from harness import RawWorker, error, ok
from mlx_worker import errors

QUICK = 15.0
HANG = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}"
HUGE = "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
CHAT = [{"role": "user", "content": "hi"}]


def model_copy(src: str, dst) -> str:
    os.makedirs(dst)
    for f in os.listdir(src):
        if os.path.isfile(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    return str(dst)


def with_template(src: str, dst, template: str) -> str:
    folder = model_copy(src, dst)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = template
    with open(path, "w") as f:
        json.dump(cfg, f)
    for f in os.listdir(folder):
        if f.endswith(".jinja"):
            os.remove(os.path.join(folder, f))
    return folder


class Stream:
    """A generate that never ends by itself: its token events tell whether
    the compute thread keeps stepping."""

    def __init__(self, w: RawWorker):
        self.w, self.id = w, f"stream-{time.monotonic_ns()}"
        id = self.id
        # A rotating cache: it runs past the context, for as long as a test needs.
        w.request("generate", {"model_id": "endless", "prompt": "Once", "max_tokens": 1_000_000, "ignore_eos": True,
                               "temperature": 0, "prompt_cache": False}, id=id)
        w.wait_for(self._is_token, timeout=QUICK)

    def _is_token(self, m: dict) -> bool:
        return m.get("method") == "token" and m["params"]["id"] == self.id

    def count(self) -> int:
        with self.w.cond:
            return sum(1 for m in self.w.messages if self._is_token(m))

    def moves(self, within: float = 3.0) -> bool:
        n = self.count()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.count() > n:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        assert ok(self.w.call("cancel", {"id": self.id}, timeout=QUICK))["cancelled"] is True
        assert ok(self.w.response(self.id, timeout=QUICK))["stop_reason"] == "cancelled"


def answered_once(w: RawWorker) -> None:
    ids = [m.get("id") for m in w.responses()]
    dupes = {i for i in ids if ids.count(i) > 1 and i is not None}
    assert not dupes, dupes
    assert not any(m.get("error", {}).get("code") == errors.INTERNAL_ERROR for m in w.responses()), w.responses()
    assert not w.bad_lines


def serves(w: RawWorker) -> None:
    reply = w.call("generate", {"model_id": "tiny", "prompt": "Once", "max_tokens": 4, "temperature": 0,
                                "ignore_eos": True, "prompt_cache": False}, timeout=QUICK)
    assert len(ok(reply)["tokens"]) == 4


@pytest.fixture(scope="module")
def hw(tiny_model):
    w = RawWorker()
    ok(w.call("load", {"model": tiny_model, "model_id": "tiny"}))
    ok(w.call("load", {"model": tiny_model, "model_id": "endless", "max_kv_size": 256}))
    yield w
    answered_once(w)
    w.close()


# ------------------------------------------ 1. a template that never finishes


def test_a_template_that_never_finishes_holds_nobody_and_is_cancelled_or_refused(hw, tiny_model, tmp_path):
    ok(hw.call("load", {"model": with_template(tiny_model, tmp_path / "hang", HANG), "model_id": "hang"}))
    ok(hw.call("load", {"model": tiny_model, "model_id": "hang2", "chat_template": HANG}))
    stream = Stream(hw)
    hw.request("generate", {"model_id": "hang", "messages": CHAT, "max_tokens": 3}, id="g")
    time.sleep(0.5)
    # Everyone else is served meanwhile: the stream, another model's methods.
    assert stream.moves()
    t0 = time.monotonic()
    ok(hw.call("detokenize", {"model_id": "tiny", "tokens": [5, 6]}, timeout=QUICK))
    ok(hw.call("tokenize", {"model_id": "tiny", "messages": CHAT}, timeout=QUICK))
    assert time.monotonic() - t0 < 5
    # Its cancel brings its final response at once.
    assert ok(hw.call("cancel", {"id": "g"}, timeout=QUICK))["cancelled"] is True
    assert ok(hw.response("g", timeout=5))["stop_reason"] == "cancelled"
    # Not cancelled: refused at the time bound, naming the messages.
    t0 = time.monotonic()
    hw.request("tokenize", {"model_id": "hang2", "messages": CHAT}, id="t")
    assert stream.moves()
    err = error(hw.response("t", timeout=30), errors.INVALID_PARAMS)
    assert err["data"]["field"] == "params.messages" and "longer than" in err["message"], err
    assert time.monotonic() - t0 < 25
    stream.stop()
    serves(hw)


def test_a_template_that_renders_gigabytes_is_refused(hw, tiny_model):
    ok(hw.call("load", {"model": tiny_model, "model_id": "huge", "chat_template": HUGE}))
    for method in ("generate", "tokenize", "cache_save"):
        params = {"model_id": "huge", "messages": CHAT}
        if method == "cache_save":
            params["path"] = "/tmp/never-written.safetensors"
        err = error(hw.call(method, params, timeout=QUICK), errors.INVALID_PARAMS)
        assert err["data"]["field"] == "params.messages" and "characters" in err["message"], err
    serves(hw)


# ------------------------------------------ 4. a huge prompt while others stream


@pytest.mark.heavy
def test_a_huge_prompt_stalls_no_stream_and_its_cancel_answers_at_once(hw):
    stream = Stream(hw)
    huge = "word " * 1_000_000  # 5 MB, ~1M tokens
    hw.request("generate", {"model_id": "tiny", "prompt": huge, "max_tokens": 3}, id="big")
    time.sleep(0.3)
    assert stream.moves(within=2.0)
    t0 = time.monotonic()
    assert ok(hw.call("cancel", {"id": "big"}, timeout=QUICK))["cancelled"] is True
    assert ok(hw.response("big", timeout=3))["stop_reason"] == "cancelled"
    assert time.monotonic() - t0 < 3
    # Uncancelled, it is refused once tokenized, the stream going on meanwhile.
    hw.request("tokenize", {"model_id": "tiny", "text": huge[: len(huge) // 4]}, id="tk")
    hw.request("generate", {"model_id": "tiny", "prompt": huge[: len(huge) // 4], "max_tokens": 3}, id="big2")
    time.sleep(0.3)
    assert stream.moves(within=2.0)
    assert ok(hw.response("tk", timeout=60))["count"] > 100_000
    assert error(hw.response("big2", timeout=60), errors.CONTEXT_OVERFLOW)
    stream.stop()
    serves(hw)


# ------------------------------------------ 2. a distributed load whose rank stalls


@pytest.mark.heavy
def test_a_distributed_load_whose_follower_stalls_ends_within_timeout_s(tiny_model):
    import signal

    from harness import pid_gone

    w = RawWorker()
    try:
        ok(w.call("load", {"model": tiny_model, "model_id": "one"}))
        tp = {"mode": "tensor", "ranks": 2, "timeout_s": 3}
        pids = ok(w.call("load", {"model": tiny_model, "model_id": "tp", "parallel": tp}, timeout=120))["parallel"]["pids"]
        os.kill(pids[1], signal.SIGSTOP)
        t0 = time.monotonic()
        w.request("load", {"model": tiny_model, "model_id": "tp2", "parallel": tp}, id="l")
        w.request("generate", {"model_id": "one", "prompt": "hi", "max_tokens": 3, "temperature": 0}, id="g")
        assert error(w.response("l", timeout=30), errors.LOAD_FAILED)["data"]["field"] == "params.parallel"
        assert time.monotonic() - t0 < 3 + 7  # timeout_s, plus noise
        ok(w.response("g", timeout=QUICK))
        assert time.monotonic() - t0 < 3 + 7
        deadline = time.monotonic() + 5
        while not pid_gone(pids[1]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_gone(pids[1])
        answered_once(w)
    finally:
        try:
            os.kill(pids[1], signal.SIGKILL)
        except (OSError, NameError):
            pass
        w.close()


# ------------------------------------------ 3, 8. config files that lie or nest


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.parametrize("layers", [20_000, 100_000])
def test_a_layer_count_the_weights_dont_hold_is_refused_before_building(hw, tiny_model, tmp_path, layers):
    folder = model_copy(tiny_model, tmp_path / "m")
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = layers
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    before = rss(hw.proc.pid)
    t0 = time.monotonic()
    err = error(hw.call("load", {"model": folder, "model_id": "liar"}, timeout=60), errors.LOAD_FAILED)
    assert time.monotonic() - t0 < 5
    assert err["data"]["field"] == "config.num_hidden_layers" and "hold 4 layers" in err["message"], err
    assert rss(hw.proc.pid) - before < 100 * 1024 * 1024
    serves(hw)


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "model.safetensors", "generation_config.json"])
def test_json_nested_past_the_recursion_limit_is_a_load_error_naming_the_file(hw, tiny_model, tmp_path, name):
    folder = model_copy(tiny_model, tmp_path / "m")
    target = os.path.join(folder, name)
    if name == "model.safetensors":
        header = ('{"__metadata__": {"a": ' + DEEP + '}}').encode()
        with open(target, "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
    else:
        with open(target, "w") as f:
            f.write('{"a": ' + DEEP + "}" if name != "config.json" else DEEP)
    err = error(hw.call("load", {"model": folder, "model_id": "deep"}, timeout=60), errors.LOAD_FAILED)
    assert err["data"]["file"] == target and "nested too deeply" in err["message"], err
    serves(hw)


# ------------------------------------------ 5-7. poisoned prompt-cache files

MiB = 1024 * 1024
SYSTEM = [{"role": "system", "content": "You are terse."}]


def saved(w: RawWorker, model_id: str, path) -> str:
    ok(w.call("cache_save", {"model_id": model_id, "messages": SYSTEM, "add_generation_prompt": False,
                             "path": str(path)}, timeout=60))
    return str(path)


def header_of(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), f.read()


def write_safetensors(path, header: dict, data: bytes, size: int | None = None) -> str:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)
        if size is not None:
            f.truncate(8 + len(raw) + size)  # sparse: declared, never written
    return str(path)


def follows_prefix(w: RawWorker, model_id: str) -> dict:
    return ok(w.call("generate", {"model_id": model_id, "messages": SYSTEM + CHAT, "max_tokens": 3,
                                  "temperature": 0}, timeout=QUICK))


def test_a_cache_file_too_big_is_refused_from_its_header_and_holds_nothing(tiny_model, tmp_path):
    w = RawWorker("--memory-limit", str(200 * MiB))
    try:
        ok(w.call("load", {"model": tiny_model, "model_id": "tiny", "prompt_cache_bytes": 50 * MiB}))
        header, data = header_of(saved(w, "tiny", tmp_path / "real.safetensors"))
        big = 400 * MiB
        header["0.0"] = {"dtype": "F32", "shape": [1, 2, big // (2 * 32 * 4), 32],
                         "data_offsets": [len(data), len(data) + big]}
        forged = write_safetensors(tmp_path / "big.safetensors", header, data, size=len(data) + big)
        before = rss(w.proc.pid)
        for _ in range(3):
            err = error(w.call("cache_load", {"model_id": "tiny", "path": forged}, timeout=60), errors.OUT_OF_MEMORY)
            assert "prompt_cache_bytes" in err["message"], err
            assert err["data"]["limit_kind"] == "prompt_cache" and err["data"]["limit"] == 50 * MiB, err
            assert err["data"]["needed"] > err["data"]["available"], err
        assert rss(w.proc.pid) - before < 100 * MiB
        # Nothing of it is held: generates and loads are admitted at once.
        assert follows_prefix(w, "tiny")["usage"]["completion_tokens"] == 3
        ok(w.call("load", {"model": tiny_model, "model_id": "tiny2"}))
        answered_once(w)
    finally:
        w.close()


def test_a_cache_file_whose_kv_doesnt_fit_the_model_is_refused(hw, small_model, tmp_path):
    ok(hw.call("load", {"model": small_model, "model_id": "small"}))
    tiny_header, _ = header_of(saved(hw, "tiny", tmp_path / "tiny.safetensors"))
    small_header, small_data = header_of(saved(hw, "small", tmp_path / "small.safetensors"))
    small_header["__metadata__"] = tiny_header["__metadata__"]  # tiny's identity over small's KV
    forged = write_safetensors(tmp_path / "forged.safetensors", small_header, small_data)
    for _ in range(2):
        err = error(hw.call("cache_load", {"model_id": "tiny", "path": forged}, timeout=QUICK), errors.CACHE_FILE_INVALID)
        assert err["data"]["path"] == forged and "shape" in err["message"], err
    for _ in range(2):
        assert follows_prefix(hw, "tiny")["usage"]["completion_tokens"] == 3
    ok(hw.call("unload", {"model_id": "small"}))
    serves(hw)


def test_a_cache_file_whose_token_count_lies_is_refused(hw, tmp_path):
    header, data = header_of(saved(hw, "tiny", tmp_path / "tiny.safetensors"))
    meta = header["__metadata__"]
    tokens = json.loads(meta["0.key"])
    meta["0.key"] = json.dumps((tokens * (3000 // len(tokens) + 1))[:3000])
    # Every layer's offset scalar says 3,000 too (float32 3000.0 in place of the real count).
    import struct

    data = bytearray(data)
    for name, entry in header.items():
        if name != "__metadata__" and name.endswith(".2"):
            start, end = entry["data_offsets"]
            assert end - start == 4, entry
            fmt = "<f" if entry["dtype"] == "F32" else "<i"
            data[start:end] = struct.pack(fmt, 3000.0 if fmt == "<f" else 3000)
    forged = write_safetensors(tmp_path / "liar.safetensors", header, bytes(data))
    for _ in range(2):
        err = error(hw.call("cache_load", {"model_id": "tiny", "path": forged}, timeout=QUICK), errors.CACHE_FILE_INVALID)
        assert err["data"]["path"] == forged and "positions" in err["message"], err
    for _ in range(2):
        assert follows_prefix(hw, "tiny")["usage"]["completion_tokens"] == 3
    serves(hw)


# ------------------------------------------ 9-11. tool schemas


@pytest.fixture(scope="module")
def tools_model():
    from fixtures.build import ensure_model

    return str(ensure_model("tiny-qwen3-tools"))


def tool(name: str, parameters=None) -> dict:
    fn = {"name": name}
    if parameters is not None:
        fn["parameters"] = parameters
    return {"type": "function", "function": fn}


@pytest.mark.parametrize("parameters", [{}, {"properties": {"x": {"type": "integer"}}}])
def test_parameters_without_a_type_give_object_arguments(hw, tools_model, parameters):
    ok(hw.call("load", {"model": tools_model, "model_id": "qwen3"}))
    for seed in range(6):
        result = ok(hw.call("generate", {"model_id": "qwen3", "messages": CHAT, "tools": [tool("f", parameters)],
                                         "tool_choice": "required", "max_tokens": 60, "seed": seed,
                                         "temperature": 1.0}, timeout=60))
        for call in result["tool_calls"]:
            assert isinstance(call["arguments"], dict), result
        assert result["tool_calls"] or result.get("invalid_tool_calls"), result


@pytest.mark.parametrize("parameters", [{"type": "string"}, {"type": "integer"}, {"type": ["object", "null"]},
                                        {"type": "array", "items": {"type": "integer"}}])
@pytest.mark.parametrize("method", ["generate", "tokenize", "cache_save"])
def test_parameters_that_are_not_an_object_schema_are_refused(hw, tools_model, tmp_path, parameters, method):
    ok(hw.call("load", {"model": tools_model, "model_id": "qwen3"}))
    params = {"model_id": "qwen3", "messages": CHAT, "tools": [tool("a", {"type": "object"}), tool("b", parameters)]}
    if method == "generate":
        params.update(tool_choice="required", max_tokens=20)
    if method == "cache_save":
        params["path"] = str(tmp_path / "c.safetensors")
    err = error(hw.call(method, params, timeout=60), errors.INVALID_PARAMS)
    assert err["data"]["field"] == "params.tools[1].function.parameters", err


@pytest.mark.parametrize("method", ["generate", "tokenize", "cache_save"])
def test_duplicate_tool_names_are_refused_by_every_method(hw, tools_model, tmp_path, method):
    ok(hw.call("load", {"model": tools_model, "model_id": "qwen3"}))
    params = {"model_id": "qwen3", "messages": CHAT, "tools": [tool("a"), tool("b"), tool("a")]}
    if method == "cache_save":
        params["path"] = str(tmp_path / "c.safetensors")
    err = error(hw.call(method, params, timeout=60), errors.INVALID_PARAMS)
    assert err["data"]["field"] == "params.tools[2].function.name", err


# ------------------------------------------ 12. a draft whose unload waits


def test_a_draft_whose_unload_waits_is_refused_as_a_draft_not_loaded(hw, tiny_model):
    ok(hw.call("load", {"model": tiny_model, "model_id": "draft"}))
    hw.request("generate", {"model_id": "tiny", "draft_model_id": "draft", "prompt": "Once", "max_tokens": 1_000_000,
                            "ignore_eos": True, "temperature": 0, "prompt_cache": False}, id="busy")
    hw.wait_for(lambda m: m.get("method") == "token" and m["params"]["id"] == "busy", timeout=QUICK)
    hw.request("unload", {"model_id": "draft"}, id="u")
    time.sleep(0.3)
    err = error(hw.call("generate", {"model_id": "tiny", "draft_model_id": "draft", "prompt": "x", "max_tokens": 2},
                        timeout=QUICK), errors.INVALID_PARAMS)
    assert err["data"]["field"] == "params.draft_model_id" and "being unloaded" in err["message"], err
    err = error(hw.call("generate", {"model_id": "draft", "prompt": "x", "max_tokens": 2}, timeout=QUICK),
                errors.MODEL_NOT_LOADED)
    assert err["data"]["field"] == "params.model_id", err
    assert ok(hw.call("cancel", {"id": "busy"}))["cancelled"] is True
    assert ok(hw.response("busy", timeout=QUICK))["stop_reason"] == "cancelled"
    assert ok(hw.response("u", timeout=QUICK))["unloaded"] is True
    serves(hw)


# ------------------------------------------ 13. concurrent requests sharing a prefix


def test_a_regenerate_beside_the_next_turn_shares_the_stored_prefix(hw):
    turn1 = SYSTEM + [{"role": "user", "content": "Name a colour, and explain why in some detail."}]
    first = ok(hw.call("generate", {"model_id": "tiny", "messages": turn1, "max_tokens": 8, "temperature": 0,
                                    "ignore_eos": True}, timeout=QUICK))
    n = first["usage"]["prompt_tokens"]
    turn2 = turn1 + [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": "Another?"}]
    common = {"model_id": "tiny", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    # One write: the next turn (takes the stored conversation), then a regenerate of turn 1.
    lines = [json.dumps({"jsonrpc": "2.0", "id": i, "method": "generate", "params": {**common, "messages": m}})
             for i, m in (("next", turn2), ("again", turn1))]
    hw.send(("\n".join(lines) + "\n").encode())
    nxt, again = ok(hw.response("next", timeout=QUICK)), ok(hw.response("again", timeout=QUICK))
    assert again["usage"]["cached_tokens"] == n - 1, again["usage"]
    assert nxt["usage"]["cached_tokens"] >= n, nxt["usage"]
    # Each equals its run without the cache.
    for params, result in ((turn2, nxt), (turn1, again)):
        cold = ok(hw.call("generate", {**common, "messages": params, "prompt_cache": False}, timeout=QUICK))
        assert cold["tokens"] == result["tokens"]
    assert again["tokens"] == first["tokens"][:4]


# ------------------------------------------ decided: accepted drafts are output tokens


def test_accepted_draft_tokens_never_exceed_completion_tokens():
    from fixtures.build import ensure_model

    w = RawWorker()
    try:
        ok(w.call("load", {"model": str(ensure_model("spec-draft")), "model_id": "draft"}, timeout=120))
        target = ok(w.call("load", {"model": str(ensure_model("spec-target")), "model_id": "target"}, timeout=120))
        eos = target["eos_token_ids"][0]
        for bias in (30.0, 0.0):  # EOS first (the draft proposes it and the target keeps it), or whenever
            result = ok(w.call("generate", {
                "model_id": "target", "draft_model_id": "draft", "num_draft_tokens": 4, "prompt": "the model",
                "max_tokens": 40, "temperature": 0, "prompt_cache": False, "logit_bias": {str(eos): bias},
            }, timeout=60))
            u = result["usage"]
            assert u["accepted_draft_tokens"] <= u["completion_tokens"], u
            if bias:
                assert result["stop_reason"] == "eos" and u["completion_tokens"] == 0, result
        answered_once(w)
    finally:
        w.close()


# ------------------------------------------ decided: status lists memory waits apart


def test_status_lists_a_generate_waiting_for_memory_as_waiting_not_running(tiny_model):
    w = RawWorker()
    try:
        weights = os.path.getsize(os.path.join(tiny_model, "model.safetensors"))
        req = {"model_id": "probe", "prompt": "Once " * 20, "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
        probe = ok(w.call("load", {"model": tiny_model, "model_id": "probe", "memory_limit": weights + 4096}))
        need = error(w.call("generate", req), errors.OUT_OF_MEMORY)["data"]["needed"]
        ok(w.call("unload", {"model_id": "probe"}))
        ok(w.call("load", {"model": tiny_model, "model_id": "tiny", "memory_limit": probe["memory_bytes"] + int(need * 1.5)}))
        req["model_id"] = "tiny"
        w.request("generate", req, id="a")
        w.wait_for(lambda m: m.get("method") == "token" and m["params"]["id"] == "a", timeout=QUICK)
        w.request("generate", req, id="b")  # waits for a's memory
        deadline = time.monotonic() + QUICK
        while True:
            queue = ok(w.call("status"))["queue"]
            if queue["waiting"] == ["b"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert queue["waiting"] == ["b"] and queue["running"] == ["a"] and queue["active"] == "a", queue
        assert queue["pending"] == 0
        for rid in ("a", "b"):
            assert ok(w.call("cancel", {"id": rid}))["cancelled"] is True
            assert ok(w.response(rid, timeout=QUICK))["stop_reason"] == "cancelled"
        queue = ok(w.call("status"))["queue"]
        assert queue["waiting"] == [] and queue["running"] == [], queue
        answered_once(w)
    finally:
        w.close()


# ------------------------------------------ decided: chunks outside the batch are sized too


def test_a_quantized_kv_prompt_beside_a_stream_stalls_it_for_a_chunk_only(hw, tiny_model):
    ok(hw.call("load", {"model": tiny_model, "model_id": "q8", "kv_bits": 8, "kv_group_size": 32}))
    prompt = [5 + i % 900 for i in range(1500)]
    quiet = {"model_id": "q8", "tokens": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
             "prefill_step_size": 4096, "prompt_cache": False}
    alone = ok(hw.call("generate", quiet, timeout=120))
    stream = Stream(hw)
    hw.request("generate", quiet, id="q")
    time.sleep(0.2)
    moved = 0
    while not any(m.get("id") == "q" for m in hw.responses()):
        moved += stream.moves(within=2.0)
        if moved >= 3:
            break
    assert moved >= 3 or ok(hw.response("q"))["timings"]["total_ms"] < 2000
    assert ok(hw.response("q", timeout=120))["tokens"] == alone["tokens"]
    stream.stop()
    ok(hw.call("unload", {"model_id": "q8"}))


# ------------------------------------------ a checkpointed model's system-prompt render


# Fast for the whole chat; the system messages alone (rendered for the
# prompt cache's system-prompt checkpoint, add_generation_prompt false) never finish.
SLOW_HEAD = ("{% if not add_generation_prompt %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
             "{% endfor %}{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_the_system_prompt_render_of_a_checkpointed_model_holds_nobody(hw):
    """A hybrid model's prompt cache renders a chat's system messages alone
    (where prefill stops for a checkpoint): that render is prompt work like
    the whole chat's, so it is bounded the same way, off the compute thread
    when slow and cancellable, never stalling the running streams."""
    from fixtures.build import ensure_model

    ok(hw.call("load", {"model": str(ensure_model("tiny-qwen3-5")), "model_id": "hybrid", "chat_template": SLOW_HEAD},
               timeout=120))
    try:
        stream = Stream(hw)
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
        hw.request("generate", {"model_id": "hybrid", "messages": chat, "max_tokens": 2}, id="h")
        time.sleep(0.5)
        assert stream.moves(within=2.0)
        assert ok(hw.call("cancel", {"id": "h"}, timeout=QUICK))["cancelled"] is True
        assert ok(hw.response("h", timeout=3))["stop_reason"] == "cancelled"
        stream.stop()
    finally:
        ok(hw.call("unload", {"model_id": "hybrid"}, timeout=QUICK))
    serves(hw)

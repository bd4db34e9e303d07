"""The wire: handshake, framing, JSON-RPC errors, and a worker that keeps serving."""

from __future__ import annotations

import json
import os
import textwrap
import time

import msgspec
import pytest

from conftest import spawn, worker_env
from mlx_worker import protocol
from mlx_worker.client import RpcError


def reply_to(worker, line: bytes | str, timeout: float = 10.0) -> dict:
    """Send a raw line and return the next unrouted message (errors the
    client did not ask for, like a reply to a line it did not frame)."""
    worker.send_line(line)
    msg = worker.unrouted.get(timeout=timeout)
    return msg


def test_ready_handshake(fresh_worker):
    ready = fresh_worker.ready
    assert ready.protocol_version == protocol.PROTOCOL_VERSION
    assert ready.worker_version and ready.mlx_version
    assert ready.device in ("cpu", "gpu")
    caps = ready.capabilities
    assert {"load", "unload", "tokenize", "detokenize", "generate", "cancel", "status", "shutdown"} <= set(caps.methods)
    assert caps.max_line_bytes > 0 and caps.batch is False
    assert ready.pid == fresh_worker.proc.pid
    # ready is the very first line on stdout
    first = json.loads(fresh_worker.lines[0])
    assert first["method"] == "ready" and "id" not in first


def test_spawn_to_ready_is_fast():
    t0 = time.perf_counter()
    w = spawn()
    elapsed = time.perf_counter() - t0
    w.close()
    assert elapsed < 10  # generous: the benchmark reports the real figure


def test_load_tokenize_generate_unload_reload(fresh_worker, tiny_model):
    w = fresh_worker
    info = w.load(tiny_model)
    assert info.model_id == "tiny-llama"  # default id: the folder name, stable
    assert info.kind == "text" and info.vocab_size == 1024 and info.context_length == 4096
    assert w.load(tiny_model).already_loaded is True
    toks = w.tokenize(text="Hello world")  # model_id may be omitted: one model loaded
    assert toks.count == len(toks.tokens) > 0
    assert w.detokenize(toks.tokens) == "Hello world"
    first = w.generate(tokens=toks.tokens, max_tokens=8, temperature=0, ignore_eos=True).wait()
    assert len(first.tokens) == 8 and first.model_id == "tiny-llama"
    assert w.unload("tiny-llama").unloaded is True
    assert w.status().models == []
    with pytest.raises(RpcError) as err:
        w.generate(tokens=toks.tokens, max_tokens=8).wait()
    assert err.value.code == -32003
    w.load(tiny_model, model_id="again")
    second = w.generate(model_id="again", tokens=toks.tokens, max_tokens=8, temperature=0, ignore_eos=True).wait()
    assert second.tokens == first.tokens


def test_two_models_at_once(fresh_worker, tiny_model, small_model):
    w = fresh_worker
    w.load(tiny_model, model_id="a")
    w.load(small_model, model_id="b")
    with pytest.raises(RpcError) as err:
        w.tokenize(text="x")
    assert err.value.code == -32003 and err.value.data["field"] == "params.model_id"
    a = w.generate(model_id="a", prompt="hi", max_tokens=5, temperature=0, ignore_eos=True).wait()
    b = w.generate(model_id="b", prompt="hi", max_tokens=5, temperature=0, ignore_eos=True).wait()
    assert a.model_id == "a" and b.model_id == "b"
    assert {m.model_id for m in w.status().models} == {"a", "b"}
    with pytest.raises(RpcError) as err:
        w.load(small_model, model_id="a")
    assert err.value.code == -32602


@pytest.mark.parametrize(
    "line, code",
    [
        (b"{not json", -32700),
        (b"\xff\xfe garbage", -32700),
        (b'{"jsonrpc":"2.0","id":1,"method":"generate"', -32700),
        (b"42", -32600),
        (b'"a string"', -32600),
        (b'[{"jsonrpc":"2.0","id":1,"method":"status"}]', -32600),
        (b'{"jsonrpc":"1.0","id":"x1","method":"status"}', -32600),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"status"}', -32600),
        (b'{"jsonrpc":"2.0","id":"x2","method":7}', -32600),
    ],
)
def test_malformed_lines_get_errors(worker, line, code):
    msg = worker.unrouted.get_nowait() if not worker.unrouted.empty() else None
    assert msg is None
    worker.send_line(line)
    msg = worker.unrouted.get(timeout=10)
    assert msg["error"]["code"] == code, msg
    assert "message" in msg["error"]
    # the worker still serves
    assert worker.status().models


def test_unknown_method(worker):
    with pytest.raises(RpcError) as err:
        worker.call("frobnicate", {})
    assert err.value.code == -32601


@pytest.mark.parametrize(
    "params, field",
    [
        ({"prompt": "x", "max_tokens": "ten"}, "params.max_tokens"),
        ({"prompt": 5}, "params.prompt"),
        ({"prompt": "x", "temperature": "hot"}, "params.temperature"),
        ({"prompt": "x", "stop": [1, 2]}, "params.stop"),
        ({"tokens": [1, "a"]}, "params.tokens[1]"),
        ({"messages": [{"role": "user", "content": 3}]}, "params.messages[0].content"),
        ({"messages": [{"content": "hi"}]}, "params.messages[0].role"),  # a missing field is named
        ({"prompt": "x", "constraint": {"type": "regex"}}, "params.constraint.pattern"),
        ({"prompt": "x", "logit_bias": {"7": "x"}}, "params.logit_bias"),  # a bad value: the mapping
        ({"prompt": "x", "max_tokenz": 3}, "params.max_tokenz"),
        ({"messages": [{"role": "user", "content": "x", "bogus": 1}]}, "params.messages[0].bogus"),
        ({"prompt": "x", "max_tokens": -1}, "params.max_tokens"),
        ({"prompt": "x", "top_logprobs": 21}, "params.top_logprobs"),
        ({"prompt": "x", "top_p": 0}, "params.top_p"),
        ({"tokens": [1, 99999]}, "params.tokens[1]"),
        ({"prompt": "x", "logit_bias": {"7": 1.0, "abc": 1.0}}, "params.logit_bias.abc"),  # a key that is not ASCII digits
        ({"prompt": "x", "tokens": [1]}, "params.tokens"),
        ({}, "params.prompt"),
    ],
)
def test_invalid_params_name_the_field(worker, params, field):
    with pytest.raises(RpcError) as err:
        worker.generate(model_id="tiny", **params).wait()
    assert err.value.code == -32602, err.value
    assert err.value.data["field"].startswith(field), (err.value.data, field)
    assert field.split(".")[-1].split("[")[0] in err.value.message or field == "params"


@pytest.mark.parametrize("method, field", [("load", "params.model"), ("cancel", "params.id"),
                                           ("detokenize", "params.tokens")])
def test_a_missing_required_field_is_named(worker, method, field):
    with pytest.raises(RpcError) as err:
        worker.call(method, {})
    assert err.value.code == -32602 and err.value.data == {"field": field}, err.value


def test_unknown_model_and_missing_path(worker, tmp_path):
    with pytest.raises(RpcError) as err:
        worker.generate(model_id="nope", prompt="x").wait()
    assert err.value.code == -32003
    with pytest.raises(RpcError) as err:
        worker.load(str(tmp_path / "does-not-exist"))
    assert err.value.code == -32001 and err.value.data["field"] == "params.model"
    (tmp_path / "empty").mkdir()
    with pytest.raises(RpcError) as err:
        worker.load(str(tmp_path / "empty"))
    assert err.value.code == -32002
    assert worker.generate(model_id="tiny", prompt="still here", max_tokens=2).wait()


def test_notifications_get_no_reply(worker):
    worker.send_line(b'{"jsonrpc":"2.0","method":"status"}')
    worker.send_line(b'{"jsonrpc":"2.0","method":"frobnicate"}')
    worker.send_line(b'{"jsonrpc":"2.0","method":"generate","params":{"prompt":5}}')
    assert worker.status().models  # a request after them is answered...
    time.sleep(0.2)
    assert worker.unrouted.empty()  # ...and nothing was sent for the notifications


def test_duplicate_in_flight_id_is_refused(worker):
    rid, inbox = worker.start("generate", {"model_id": "tiny", "prompt": "long", "max_tokens": 100000,
                                          "ignore_eos": True}, rid="dup")
    worker.send_line(msgspec.json.encode({"jsonrpc": "2.0", "id": "dup", "method": "status"}))
    worker.send_line(msgspec.json.encode({"jsonrpc": "2.0", "id": "dup", "method": "tokenize",
                                          "params": {"model_id": "tiny", "text": "x"}}))
    # both duplicates are refused, the immediate method (status) included
    seen = []
    while len(seen) < 2:
        msg = inbox.get(timeout=30)
        if "method" not in msg:
            seen.append(msg)
    assert [m["error"]["code"] for m in seen] == [-32600, -32600]
    assert worker.cancel("dup") is True
    while True:
        msg = inbox.get(timeout=30)
        if "result" in msg and "stop_reason" in msg["result"]:
            assert msg["result"]["stop_reason"] == "cancelled"
            break
    worker._finish(rid)


def test_oversized_line_is_skipped():
    w = spawn("--max-line-bytes", "4096")
    try:
        big = b'{"jsonrpc":"2.0","id":77,"method":"tokenize","params":{"text":"' + b"a" * 100_000 + b'"}}'
        w.send_line(big)
        msg = w.unrouted.get(timeout=10)
        assert msg["error"]["code"] == -32600 and msg["id"] == 77
        assert w.status().models == []  # still serving
    finally:
        w.close()


def test_library_output_cannot_corrupt_stdout(tmp_path, tiny_model):
    # A module imported at interpreter start that, once the worker runs,
    # writes to stdout from Python (print, sys.__stdout__, fd 1) and from C.
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import ctypes, os, sys, threading, time
        original = os.fstat(1)
        def noisy():
            # Start once the worker has taken fd 1 for itself (after start-up
            # any library may print); the noise must all land on stderr.
            while os.path.sameopenfile(1, 2) is False and os.fstat(1).st_ino == original.st_ino:
                time.sleep(0.01)
            for _ in range(20):
                print("PY-PRINT-NOISE")
                sys.__stdout__.write("DUNDER-NOISE\\n"); sys.__stdout__.flush()
                os.write(1, b"FD1-NOISE\\n")
                libc = ctypes.CDLL(None); libc.printf(b"C-PRINTF-NOISE\\n"); libc.fflush(None)
                threading.Event().wait(0.05)
        threading.Thread(target=noisy, daemon=True).start()
    """))
    env = worker_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{worker_env()['PYTHONPATH']}")
    w = spawn(env=env)
    try:
        w.load(tiny_model)
        for _ in range(5):
            w.generate(prompt="noise", max_tokens=20, ignore_eos=True).wait()
        time.sleep(1.0)
        w.status()
    finally:
        w.close()
    for line in w.lines:
        msg = json.loads(line)  # every stdout line is a protocol message
        assert msg.get("jsonrpc") == "2.0"
    assert not any(b"NOISE" in line for line in w.lines)


def test_stdin_eof_exits_zero_promptly(tiny_model):
    w = spawn()
    w.load(tiny_model)
    w.generate(prompt="x", max_tokens=100000, ignore_eos=True)
    time.sleep(0.3)
    t0 = time.perf_counter()
    code = w.close(timeout=10)
    assert code == 0
    assert time.perf_counter() - t0 < 3


def test_shutdown_replies_then_exits_zero(fresh_worker):
    assert fresh_worker.call("shutdown", {}) == {"shutting_down": True}
    assert fresh_worker.proc.wait(10) == 0


def test_cancel_and_status_are_not_queued_behind_generation(worker):
    stream = worker.generate(model_id="tiny", prompt="busy", max_tokens=100000, ignore_eos=True)
    next(iter(stream))
    t0 = time.perf_counter()
    status = worker.status()
    assert status.queue.active == stream.id
    assert time.perf_counter() - t0 < 2
    assert stream.cancel() is True
    assert stream.wait().stop_reason == "cancelled"

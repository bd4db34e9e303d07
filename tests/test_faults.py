"""Faults a host can cause: stdin EOF, signals, a stalled or closed stdout,
a dying parent. Each must end (or recover) within about a second; the bounds
below are generous (3 s) because CI machines are noisy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from harness import RawWorker, exited_within, pid_gone, worker_cmd, worker_env

QUICK = 3.0
ENDLESS = {"model_id": "tiny", "prompt": "Once", "max_tokens": 1_000_000, "ignore_eos": True, "temperature": 0.7, "seed": 1}


def loaded(*args: str, tiny_model: str, **kw) -> RawWorker:
    """A worker with tiny-llama loaded behind a rotating KV cache, so a
    generation runs until it is stopped (no context limit ends it)."""
    w = RawWorker(*args, **kw)
    reply = w.call("load", {"model": tiny_model, "model_id": "tiny", "max_kv_size": 256})
    assert "result" in reply, reply
    return w


def first_token(w: RawWorker, rid) -> None:
    w.wait_for(lambda m: m.get("method") == "token" and m["params"]["id"] == rid)


def no_traceback(w: RawWorker) -> None:
    err = w.stderr()
    assert "Traceback" not in err, err[-3000:]
    assert len(err.splitlines()) < 20, err[-3000:]


# -------------------------------------------------------- EOF and signals


@pytest.mark.parametrize("how", ["eof", "SIGTERM", "SIGINT"])
def test_stop_during_generation_answers_then_exits(tiny_model, how):
    w = loaded(tiny_model=tiny_model)
    try:
        w.request("generate", ENDLESS, id="g")
        # Runs between g's decode steps (scheduler), or is still queued at the stop.
        w.request("tokenize", {"model_id": "tiny", "text": "queued"}, id="q")
        first_token(w, "g")
        t0 = time.monotonic()
        if how == "eof":
            w.close_stdin()
        else:
            w.proc.send_signal(getattr(signal, how))
        took = exited_within(w.proc, QUICK)
        assert took is not None, f"worker still running {QUICK} s after {how}"
        assert w.proc.returncode == 0
        # Every request was answered before the exit.
        final = w.response("g", timeout=QUICK)
        assert final["result"]["stop_reason"] == "cancelled"
        queued = w.response("q", timeout=QUICK)
        assert "result" in queued or queued["error"]["code"] == -32010
        assert time.monotonic() - t0 < QUICK
        assert not w.bad_lines
        no_traceback(w)
    finally:
        w.close()


def test_sigterm_while_stdout_is_full_still_exits(tiny_model):
    w = loaded(tiny_model=tiny_model)
    try:
        w.pause_reading()
        w.request("generate", ENDLESS, id="g")
        time.sleep(1.0)  # the generation fills the pipe; the writer blocks
        w.proc.send_signal(signal.SIGTERM)
        assert exited_within(w.proc, QUICK) is not None
    finally:
        w.close()


def test_requests_after_shutdown_are_answered_until_exit(tiny_model):
    w = loaded(tiny_model=tiny_model)
    try:
        lines = [
            {"jsonrpc": "2.0", "id": "s", "method": "shutdown"},
            {"jsonrpc": "2.0", "id": "st", "method": "status"},
            {"jsonrpc": "2.0", "id": "t", "method": "tokenize", "params": {"model_id": "tiny", "text": "late"}},
        ]
        w.send(b"".join(json.dumps(m).encode() + b"\n" for m in lines), newline=False)
        assert exited_within(w.proc, QUICK) is not None and w.proc.returncode == 0
        assert w.response("s")["result"] == {"shutting_down": True}
        assert "result" in w.response("st")
        assert w.response("t")["error"]["code"] == -32010
    finally:
        w.close()


# ------------------------------------------------------------ slow host


def test_stalled_host_cancel_is_honoured_at_once(tiny_model):
    """The host stops reading stdout mid-generation, sends cancel, and reads
    again later: the generation stopped at the cancel, not at the drain, and
    everything it streamed arrives intact (merged into fewer lines)."""
    w = loaded(tiny_model=tiny_model)
    try:
        start = len(w.messages)
        # top_logprobs makes each event ~1 KB, so the pipe fills fast.
        w.request("generate", dict(ENDLESS, top_logprobs=20), id="g")
        first_token(w, "g")
        t_first = time.monotonic()
        w.pause_reading()
        time.sleep(1.0)  # ample time to fill a 64 KiB pipe
        w.request("cancel", {"id": "g"}, id="c")
        t_cancel = time.monotonic()
        time.sleep(1.5)  # a generation that ignored the cancel would run on
        w.resume_reading()
        assert w.response("c")["result"] == {"cancelled": True}
        result = w.response("g")["result"]
        assert result["stop_reason"] == "cancelled"
        n = len(result["tokens"])
        assert n < ENDLESS["max_tokens"] // 10
        # Decode time implied by the result: it ended near the cancel, not
        # 1.5 s later when the host read again.
        decode_s = n / result["timings"]["generation_tps"]
        assert decode_s < (t_cancel - t_first) + 0.75, (n, result["timings"])
        events = [m["params"] for m in w.messages[start:] if m.get("method") == "token"]
        assert all(e["id"] == "g" for e in events)
        assert "".join(e["text"] for e in events) == result["text"]
        assert [t for e in events for t in e["tokens"]] == result["tokens"]
        assert len(events) < n, "token events were not merged while stdout was full"
        status = w.call("status", {})["result"]
        assert status["queue"]["active"] is None
        after = w.call("generate", dict(ENDLESS, max_tokens=4))["result"]
        assert len(after["tokens"]) == 4
    finally:
        w.close()


def plain_worker(tiny_model: str | None = None) -> subprocess.Popen:
    """A worker without a reader thread (so the test may close stdout)."""
    proc = subprocess.Popen(worker_cmd(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=worker_env(), bufsize=0)
    assert json.loads(proc.stdout.readline())["method"] == "ready"
    if tiny_model:
        proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "load",
                                     "params": {"model": tiny_model, "model_id": "tiny", "max_kv_size": 256}}).encode() + b"\n")
        msg = json.loads(proc.stdout.readline())
        while msg.get("method") == "load_progress":  # the load's events come before its result
            msg = json.loads(proc.stdout.readline())
        assert "result" in msg
    return proc


@pytest.mark.parametrize("busy", [True, False], ids=["generating", "idle"])
def test_host_closes_stdout(tiny_model, busy):
    proc = plain_worker(tiny_model)
    try:
        if busy:
            proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "generate", "params": ENDLESS}).encode() + b"\n")
            proc.stdout.read(4096)  # it is streaming
        proc.stdout.close()
        took = exited_within(proc, QUICK)
        assert took is not None, "worker kept running with nobody reading stdout"
        assert proc.returncode == 0
        err = proc.stderr.read().decode()
        assert "Traceback" not in err and len(err.splitlines()) < 10, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# ----------------------------------------------------------- parent death

INTERMEDIATE = textwrap.dedent("""
    import os, subprocess, sys, time
    stdin, stdout = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (subprocess.PIPE, subprocess.PIPE)
    proc = subprocess.Popen(sys.argv[3:] if len(sys.argv) > 3 else {cmd!r}, stdin=stdin, stdout=stdout)
    print(proc.pid, flush=True)
    time.sleep(600)
""")


def run_intermediate(*args: str, pass_fds=()) -> subprocess.Popen:
    script = INTERMEDIATE.format(cmd=worker_cmd())
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            env=worker_env(), pass_fds=pass_fds)


def test_parent_killed_worker_exits():
    """kill -9 of the process that spawned the worker: its pipes close and
    (on Linux) the parent-death signal arrives; the worker must not linger."""
    parent = run_intermediate()
    try:
        pid = int(parent.stdout.readline())
        time.sleep(0.5)  # let it get past start-up
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + QUICK
        while not pid_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_gone(pid), "orphaned worker still running"
    finally:
        if not pid_gone(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_parent_death_signal_alone_ends_the_worker():
    """The worker's stdin and stdout stay open (this test holds them), so
    only the parent-death signal can tell it that its parent died."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    parent = run_intermediate(str(in_r), str(out_w), *worker_cmd(), pass_fds=(in_r, out_w))
    os.close(in_r)
    os.close(out_w)
    pid = None
    try:
        pid = int(parent.stdout.readline())
        with os.fdopen(out_r, "rb", buffering=0) as out:
            ready = json.loads(out.readline())
            assert ready["method"] == "ready" and ready["params"]["pid"] == pid
            parent.kill()
            parent.wait()
            deadline = time.monotonic() + QUICK
            while not pid_gone(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert pid_gone(pid), "worker outlived its parent"
    finally:
        os.close(in_w)
        if pid and not pid_gone(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_worker_survives_the_exit_of_the_thread_that_spawned_it():
    """PR_SET_PDEATHSIG fires when the spawning *thread* ends; a host that
    spawns from a short-lived thread must keep its worker."""
    box = []
    t = threading.Thread(target=lambda: box.append(RawWorker()))
    t.start()
    t.join()
    w = box[0]
    try:
        time.sleep(1.0)
        assert w.alive()
        assert "result" in w.call("status", {}, timeout=QUICK)
    finally:
        w.close()


# ------------------------------------------------------------- the writer


def test_writer_survives_a_message_it_cannot_encode():
    """A reply that cannot be encoded (a bug upstream) still answers its
    request, with -32603; a notification is dropped; later messages flow."""
    from mlx_worker import protocol
    from mlx_worker.transport import LineWriter

    r, w = os.pipe()
    broken = []
    writer = LineWriter(w, on_broken=lambda: broken.append(True))
    try:
        writer.send(protocol.Response(id=1, result=object()))
        writer.send(protocol.Notification("token", object()))
        writer.send(protocol.Response(id=2, result={"ok": True}))
        assert writer.flush(5)
        with os.fdopen(r, "rb", closefd=False) as out:
            first, second = json.loads(out.readline()), json.loads(out.readline())
        assert first["id"] == 1 and first["error"]["code"] == -32603
        assert second == {"id": 2, "result": {"ok": True}, "jsonrpc": "2.0"}
        assert not broken
    finally:
        writer.close()
        os.close(r)
        os.close(w)


# ------------------------------------------------------------ load, stdout


def test_queue_limit_answers_busy_and_recovers(tiny_model):
    w = loaded("--max-pending", "2", tiny_model=tiny_model)
    try:
        w.request("generate", ENDLESS, id="long")
        first_token(w, "long")
        for i in range(2):
            w.request("tokenize", {"model_id": "tiny", "text": "q"}, id=f"q{i}")
        w.request("tokenize", {"model_id": "tiny", "text": "q"}, id="over")
        busy = w.response("over")
        assert busy["error"]["code"] == -32006
        assert "result" in w.call("status", {})  # answered at once, never queued
        w.request("cancel", {"id": "long"}, id="c")
        assert w.response("long")["result"]["stop_reason"] == "cancelled"
        assert "result" in w.response("q0") and "result" in w.response("q1")
        assert "result" in w.call("tokenize", {"model_id": "tiny", "text": "again"})
        assert not w.bad_lines
    finally:
        w.close()


def test_stdout_writes_from_inside_the_worker_never_reach_the_protocol(tiny_model, tmp_path):
    """A model's own code (run with trust_remote_code) prints to stdout from
    Python, through fd 1 and from C: all of it lands on stderr."""
    import shutil

    folder = tmp_path / "chatty"
    shutil.copytree(tiny_model, folder)
    (folder / "chatty_model.py").write_text(textwrap.dedent("""
        import ctypes, os, sys
        print("PRINTED-BY-PYTHON")
        sys.stdout.flush()
        os.write(1, b"WRITTEN-TO-FD-1\\n")
        libc = ctypes.CDLL(None)
        libc.puts(b"PUT-BY-C")
        libc.fflush(None)
        from mlx_lm.models.llama import Model, ModelArgs
    """))
    config = json.loads((folder / "config.json").read_text())
    config["model_file"] = "chatty_model.py"
    (folder / "config.json").write_text(json.dumps(config))
    w = RawWorker()
    try:
        reply = w.call("load", {"model": str(folder), "model_id": "chatty", "trust_remote_code": True})
        assert "result" in reply, reply
        assert "result" in w.call("generate", {"model_id": "chatty", "prompt": "x", "max_tokens": 2})
        assert not w.bad_lines, w.bad_lines
        err = w.stderr()
        for marker in ("PRINTED-BY-PYTHON", "WRITTEN-TO-FD-1", "PUT-BY-C"):
            assert marker in err
    finally:
        w.close()

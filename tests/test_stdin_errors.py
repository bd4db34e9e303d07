"""stdin read errors: only a real end of input ends the worker.

A host may hand the worker a non-blocking pipe (libuv, which Node and
Electron use, makes its pipes non-blocking, and the flag is shared with the
child): a read then fails with EAGAIN whenever no line is waiting. That is
not an end of input. A read that keeps failing (EIO from a terminal that
went away, ENOTCONN here) is logged, and the worker stops cleanly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

from harness import RawWorker, exited_within, worker_cmd, worker_env

from conftest import ROOT

QUICK = 3.0


def test_non_blocking_stdin_is_not_end_of_input(tiny_model):
    w = RawWorker(preexec_fn=lambda: os.set_blocking(0, False))
    try:
        time.sleep(0.5)  # no line waiting: every read so far said EAGAIN
        assert w.alive(), w.stderr()
        assert "result" in w.call("load", {"model": tiny_model, "model_id": "tiny"})
        time.sleep(0.3)
        reply = w.call("generate", {"model_id": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert len(reply["result"]["tokens"]) <= 3
        # Lines that arrive in pieces, with pauses between them, still frame.
        w.send(b'{"jsonrpc":"2.0","id":"split","meth', newline=False)
        time.sleep(0.2)
        w.send(b'od":"status"}')
        assert "result" in w.response("split")
        # A real end of input still ends it, promptly and cleanly.
        w.close_stdin()
        assert exited_within(w.proc, QUICK) is not None
        assert w.proc.returncode == 0
    finally:
        w.close()


def test_persistent_read_error_is_logged_and_stops_cleanly():
    # stdin is a socket that was never connected: every read fails
    # (ENOTCONN), as every read of a terminal that went away fails (EIO).
    with socket.socket() as unconnected:
        proc = subprocess.Popen(worker_cmd(), stdin=unconnected.fileno(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=worker_env(), cwd=str(ROOT))
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["method"] == "ready"
        assert exited_within(proc, QUICK) is not None
        assert proc.returncode == 0
        stderr = proc.stderr.read().decode()
        assert "reading stdin failed" in stderr and "not connected" in stderr, stderr
        assert "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_non_blocking_stdout_waits_for_a_slow_host(tiny_model):
    # The same host usually hands stdout over non-blocking too: a full pipe
    # (the host reads slowly) then says EAGAIN, which is not a broken pipe.
    w = RawWorker(preexec_fn=lambda: os.set_blocking(1, False))
    try:
        assert "result" in w.call("load", {"model": tiny_model, "model_id": "tiny"})
        w.pause_reading()
        w.request("generate", {"model_id": "tiny", "prompt": "Once", "max_tokens": 1500, "temperature": 0,
                               "ignore_eos": True, "top_logprobs": 20}, id="long")
        time.sleep(2.0)  # tens of KB of token events: the pipe is full
        w.resume_reading()
        result = w.response("long", timeout=120)["result"]
        assert len(result["tokens"]) == 1500
        streamed = [t for m in w.messages if m.get("method") == "token" for t in m["params"]["tokens"]]
        assert streamed == result["tokens"]
    finally:
        w.close()

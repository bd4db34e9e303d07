"""stdin read errors: only a real end of input ends the worker.

A host may hand the worker a non-blocking pipe (libuv, which Node and
Electron use, makes its pipes non-blocking, and the flag is shared with the
child): a read then fails with EAGAIN whenever no line is waiting. That is
not an end of input. A terminal that goes away (EIO) is a persistent error:
the worker logs it and stops cleanly.
"""

from __future__ import annotations

import json
import os
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
    # A pseudo-terminal whose other end is closed fails every read with EIO.
    master, slave = os.openpty()
    proc = subprocess.Popen(worker_cmd(), stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=worker_env(), cwd=str(ROOT))
    os.close(slave)
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["method"] == "ready"
        os.close(master)
        assert exited_within(proc, QUICK) is not None
        assert proc.returncode == 0
        stderr = proc.stderr.read().decode()
        assert "Input/output error" in stderr or "EIO" in stderr, stderr
        assert "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()

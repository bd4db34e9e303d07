"""A line-level harness for a real worker: raw bytes in, every stdout line kept.

``WorkerClient`` routes replies by id and decodes them into Structs; the
reliability tests need the opposite: send bytes that are not requests at all,
count every line that comes back, and see stdout and stderr exactly as a host
would. Everything here goes through a real ``python -m mlx_worker`` process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional

from conftest import ROOT, worker_env


def worker_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlx_worker", *args]


class RawWorker:
    """A worker process with every stdout line parsed and kept in order.

    ``messages`` holds each line decoded with Python's strict ``json`` (any
    line that is not one JSON object is recorded in ``bad_lines``, which
    must stay empty: stdout is protocol only). stderr goes to a file.
    """

    def __init__(self, *args: str, read_stdout: bool = True, **popen: Any):
        self.stderr_file = tempfile.TemporaryFile()
        popen.setdefault("env", worker_env())
        popen.setdefault("cwd", str(ROOT))
        self.proc = subprocess.Popen(
            worker_cmd(*args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr_file,
            bufsize=0,
            **popen,
        )
        self.messages: list[dict] = []
        self.bad_lines: list[bytes] = []
        self.cond = threading.Condition()
        self.eof = False
        self._reading = threading.Event()
        if read_stdout:
            self._reading.set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ready = self.wait_for(lambda m: m.get("method") == "ready", timeout=60)["params"]

    # ----------------------------------------------------------- plumbing

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        buf = b""
        while True:
            self._reading.wait()
            chunk = os.read(out.fileno(), 1 << 16)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            parsed = []
            for line in lines:
                try:
                    msg = json.loads(line, parse_constant=_no_constants)
                    if not isinstance(msg, dict):
                        raise ValueError("not an object")
                    parsed.append(msg)
                except ValueError:
                    self.bad_lines.append(line)
            with self.cond:
                self.messages.extend(parsed)
                self.cond.notify_all()
        with self.cond:
            if buf:
                self.bad_lines.append(buf)  # a last line without its newline
            self.eof = True
            self.cond.notify_all()

    def pause_reading(self) -> None:
        """Stop reading stdout, as a host that stalls does (the pipe fills)."""
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def send(self, data: bytes, newline: bool = True) -> None:
        assert self.proc.stdin is not None
        if newline and not data.endswith(b"\n"):
            data += b"\n"
        self.proc.stdin.write(data)

    def request(self, method: str, params: Any = None, id: Any = None, **extra: Any) -> None:
        message: dict = {"jsonrpc": "2.0", "method": method, **extra}
        if id is not None:
            message["id"] = id
        if params is not None:
            message["params"] = params
        self.send(json.dumps(message).encode())

    def wait_for(self, pred: Callable[[dict], bool], timeout: float = 30.0, start: int = 0) -> dict:
        """The first message (from index ``start``) matching ``pred``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for msg in self.messages[start:]:
                    if pred(msg):
                        return msg
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    raise TimeoutError(f"no matching message (eof={self.eof}); last: {self.messages[-3:]}")
                self.cond.wait(left)

    def response(self, id: Any, timeout: float = 30.0) -> dict:
        return self.wait_for(lambda m: "method" not in m and same_id(m.get("id"), id), timeout)

    def call(self, method: str, params: Any = None, id: Any = None, timeout: float = 60.0) -> dict:
        """Send a request and return its response message (result or error)."""
        id = id if id is not None else f"call-{time.monotonic_ns()}"
        self.request(method, params, id=id)
        return self.response(id, timeout)

    def responses(self) -> list[dict]:
        with self.cond:
            return [m for m in self.messages if "method" not in m]

    def stderr(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close_stdin(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except OSError:
            pass

    def close(self, timeout: float = 10.0) -> Optional[int]:
        self.close_stdin()
        self.resume_reading()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.stderr_file.close()


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN/Infinity


def ok(reply: dict) -> dict:
    """A reply's result (asserting it is one)."""
    assert "result" in reply, reply
    return reply["result"]


def error(reply: dict, code: int) -> dict:
    assert "error" in reply, reply
    assert reply["error"]["code"] == code, reply
    return reply["error"]


def same_id(a: Any, b: Any) -> bool:
    # JSON ids: 1 and "1" differ, and a bool is never an int here.
    return type(a) is type(b) and a == b


def exited_within(proc: subprocess.Popen, seconds: float) -> Optional[float]:
    """Seconds the process took to exit, or None if it is still running."""
    start = time.monotonic()
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - start


def pid_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie waiting to be reaped counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False

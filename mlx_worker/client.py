"""A typed Python client: spawns the worker and speaks its protocol.

    with WorkerClient() as w:
        w.load("/abs/path/to/model")
        for event in w.generate(prompt="Hello", max_tokens=20):
            ...  # ProgressEvent / TokenEvent, then the GenerateResult

Structs of ``mlx_worker.protocol``; ``RpcError``; thread-safe. Spec: protocol/README.md § Host clients.
"""

from __future__ import annotations

import itertools
import os
import queue
import subprocess
import sys
import threading
from typing import Any, Iterator, Optional, Sequence, Union

import msgspec

from . import protocol

_decoder = msgspec.json.Decoder()


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class WorkerExited(Exception):
    pass


Event = Union[protocol.ProgressEvent, protocol.TokenEvent]


class GenerateStream:
    """Iterates a generation's events; ``result`` is set when it ends."""

    def __init__(self, client: "WorkerClient", rid: Any, inbox: "queue.Queue", timeout: Optional[float]):
        self.client = client
        self.id = rid
        self._inbox = inbox
        self._timeout = timeout
        self.result: Optional[protocol.GenerateResult] = None
        self.events: list[Event] = []

    def __iter__(self) -> Iterator[Union[Event, protocol.GenerateResult]]:
        while self.result is None:
            msg = self.client._take(self._inbox, self._timeout)
            method = msg.get("method")
            if method == "token":
                event: Event = msgspec.convert(msg["params"], protocol.TokenEvent)
            elif method == "progress":
                event = msgspec.convert(msg["params"], protocol.ProgressEvent)
            else:
                self.client._finish(self.id)
                if "error" in msg:
                    err = msg["error"]
                    raise RpcError(err["code"], err["message"], err.get("data"))
                self.result = msgspec.convert(msg["result"], protocol.GenerateResult)
                yield self.result
                return
            self.events.append(event)
            yield event

    def channel_text(self, channel: protocol.Channel) -> str:
        """The text streamed so far in one channel."""
        return "".join(e.text for e in self.events if isinstance(e, protocol.TokenEvent) and e.channel == channel)

    def tool_call_texts(self) -> list[str]:
        """Each tool call's text streamed so far (the last may be partial):
        what a host shows while a call is being written."""
        calls: dict[int, str] = {}
        for e in self.events:
            if isinstance(e, protocol.TokenEvent) and e.channel == "tool_call":
                calls[e.tool_call_index] = calls.get(e.tool_call_index, "") + e.text  # type: ignore[index]
        return [calls[i] for i in sorted(calls)]

    def wait(self) -> protocol.GenerateResult:
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def cancel(self) -> bool:
        return self.client.cancel(self.id)


class WorkerClient:
    def __init__(
        self,
        args: Sequence[str] = (),
        python: str = sys.executable,
        env: Optional[dict] = None,
        cwd: Optional[str] = None,
        stderr: Any = None,
        ready_timeout: float = 60.0,
        trace: bool = False,
    ):
        """``trace=True`` keeps every line sent and received in ``sent`` and
        ``lines`` (tests and the demo use it; it grows without bound)."""
        full_env = dict(os.environ if env is None else env)
        full_env.setdefault("HF_HUB_OFFLINE", "1")
        self.proc = subprocess.Popen(
            [python, "-m", "mlx_worker", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=full_env,
            cwd=cwd,
            bufsize=0,
        )
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._inboxes: dict[Any, queue.Queue] = {}
        self.unrouted: "queue.Queue[dict]" = queue.Queue()  # e.g. errors with id null
        self._ready: "queue.Queue[dict]" = queue.Queue()
        self.trace = trace
        self.lines: list[bytes] = []  # every raw stdout line, when tracing
        self.sent: list[bytes] = []  # every line written to stdin, when tracing
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        msg = self._take(self._ready, ready_timeout)
        self.ready = msgspec.convert(msg["params"], protocol.ReadyEvent)

    # ---------------------------------------------------------------- plumbing

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self.trace:
                self.lines.append(line)
            try:
                msg = _decoder.decode(line)
            except msgspec.DecodeError:
                self.unrouted.put({"invalid_line": line})
                continue
            if msg.get("method") == "ready":
                self._ready.put(msg)
                continue
            rid = msg["params"].get("id") if "method" in msg else msg.get("id")
            with self._lock:
                inbox = self._inboxes.get(_key(rid))
            (inbox or self.unrouted).put(msg)
        with self._lock:
            inboxes = list(self._inboxes.values())
        for inbox in inboxes + [self._ready, self.unrouted]:
            inbox.put({"eof": True})

    def _take(self, inbox: "queue.Queue", timeout: Optional[float]) -> dict:
        try:
            msg = inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no reply from the worker in time") from None
        if msg.get("eof"):
            inbox.put(msg)
            raise WorkerExited(f"worker exited (code {self.proc.poll()})")
        return msg

    def _finish(self, rid: Any) -> None:
        with self._lock:
            self._inboxes.pop(_key(rid), None)

    def send_line(self, line: Union[bytes, str]) -> None:
        """Write raw bytes as one line (tests use it for malformed input)."""
        data = line.encode() if isinstance(line, str) else line
        assert self.proc.stdin is not None
        data = data if data.endswith(b"\n") else data + b"\n"
        with self._write_lock:
            if self.trace:
                self.sent.append(data)
            self.proc.stdin.write(data)

    def start(self, method: str, params: Any = None, rid: Any = None) -> tuple[Any, "queue.Queue"]:
        rid = next(self._ids) if rid is None else rid
        inbox: queue.Queue = queue.Queue()
        with self._lock:
            self._inboxes[_key(rid)] = inbox
        message: dict = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            message["params"] = params
        self.send_line(msgspec.json.encode(message))
        return rid, inbox

    def call(self, method: str, params: Any = None, timeout: Optional[float] = 120.0) -> Any:
        """Send a request and return its raw ``result`` (raises RpcError)."""
        rid, inbox = self.start(method, params)
        try:
            while True:
                msg = self._take(inbox, timeout)
                if "method" not in msg:
                    break
        finally:
            self._finish(rid)
        if "error" in msg:
            err = msg["error"]
            raise RpcError(err["code"], err["message"], err.get("data"))
        return msg["result"]

    # ------------------------------------------------------------------ methods

    def load(self, model: str, **options: Any) -> protocol.LoadResult:
        return msgspec.convert(self.call("load", {"model": model, **options}), protocol.LoadResult)

    def unload(self, model_id: Optional[str] = None) -> protocol.UnloadResult:
        params = {} if model_id is None else {"model_id": model_id}
        return msgspec.convert(self.call("unload", params), protocol.UnloadResult)

    def tokenize(self, **params: Any) -> protocol.TokenizeResult:
        return msgspec.convert(self.call("tokenize", params), protocol.TokenizeResult)

    def detokenize(self, tokens: list[int], model_id: Optional[str] = None) -> str:
        params: dict = {"tokens": tokens}
        if model_id is not None:
            params["model_id"] = model_id
        return self.call("detokenize", params)["text"]

    def generate(self, timeout: Optional[float] = 300.0, **params: Any) -> GenerateStream:
        """Start a generation; iterate the stream for events, or ``.wait()``."""
        rid, inbox = self.start("generate", params)
        return GenerateStream(self, rid, inbox, timeout)

    def embed(self, input: Any, **params: Any) -> protocol.EmbedResult:
        """Vectors for a string, strings or token ids (``model_id``,
        ``normalize``, ``dimensions``, ``truncate`` as keywords)."""
        return msgspec.convert(self.call("embed", {"input": input, **params}), protocol.EmbedResult)

    def cancel(self, rid: Any) -> bool:
        return self.call("cancel", {"id": rid})["cancelled"]

    def set_limits(self, **params: Any) -> protocol.SetLimitsResult:
        return msgspec.convert(self.call("set_limits", params), protocol.SetLimitsResult)

    def status(self) -> protocol.StatusResult:
        return msgspec.convert(self.call("status", {}), protocol.StatusResult)

    def shutdown(self, timeout: float = 10.0) -> int:
        self.call("shutdown", {})
        return self.proc.wait(timeout)

    def close(self, timeout: float = 10.0) -> int:
        """Close stdin (the worker exits on EOF) and reap the process."""
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _key(rid: Any) -> Any:
    # 1 and "1" are different ids; True is not a valid id at all.
    return (type(rid).__name__, rid)

"""Requests in, responses out: validation, routing, the queue, cancel.

Three threads: the reader decodes stdin lines and answers what must not wait
(``cancel``, ``status``, ``shutdown``, every validation error); the compute
thread runs everything that touches MLX, one job at a time, in arrival order;
the writer (transport.LineWriter) serializes output.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import msgspec

from . import errors, protocol
from .errors import WorkerError
from .transport import LineWriter, Oversized, read_lines

log = logging.getLogger("mlx_worker.server")

# Answered on the reader thread, never queued behind a generation.
IMMEDIATE = {"cancel", "status", "shutdown"}
# What `cancel` stops: a generate ends with stop_reason "cancelled", a load with -32012.
CANCELLABLE = {"generate", "load"}

# After a top-level "id" key: a whole integer or string, then `,` or `}`.
_ID_VALUE = re.compile(rb'\s*:\s*(-?\d{1,18}|"(?:[^"\\]|\\.){0,200}")\s*[,}]')


@dataclass(eq=False)  # a job is itself: `in queue` compares identity
class Job:
    id: Any
    method: str
    params: Any
    received: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    finished: bool = False
    answered: bool = False  # its one final response is out (or being sent)
    # A generate's token events sent so far: what a cancelled result carries.
    streamed_text: list = field(default_factory=list)
    streamed_tokens: list = field(default_factory=list)
    streamed_channels: dict = field(default_factory=lambda: {"content": [], "reasoning": []})
    streamed_calls: dict = field(default_factory=dict)  # tool_call_index -> its text so far

    def record(self, event: protocol.TokenEvent) -> None:
        self.streamed_text.append(event.text)
        self.streamed_tokens.extend(event.tokens)
        if event.channel == "tool_call" and isinstance(event.tool_call_index, int):
            self.streamed_calls.setdefault(event.tool_call_index, []).append(event.text)
        else:
            self.streamed_channels.get(event.channel, []).append(event.text)

    def cancelled_result(self) -> protocol.GenerateResult:
        """A cancelled generate's result when its work could not finish it:
        it carries exactly what its token events delivered."""
        return protocol.cancelled_result(
            self.params, "".join(self.streamed_text), list(self.streamed_tokens),
            content="".join(self.streamed_channels["content"]),
            reasoning="".join(self.streamed_channels["reasoning"]),
            call_texts=["".join(self.streamed_calls[i]) for i in sorted(self.streamed_calls)],
        )


@dataclass
class Config:
    max_line_bytes: int = 8 * 1024 * 1024
    max_pending: int = 64
    blas: Optional[str] = None
    memory_limit: Optional[int] = None


class Worker:
    def __init__(self, in_fd: int, out_fd: int, config: Config):
        self.config = config
        self.in_fd = in_fd
        self.started = time.monotonic()
        self.stopping = threading.Event()
        self.reader_idle = threading.Event()  # every line read so far is handled
        self.exit_code = 0
        self.writer = LineWriter(out_fd, on_broken=lambda: self.stop("stdout closed"))
        self.jobs: dict[Any, Job] = {}  # every request in flight, queued or running
        self.queue: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.active: Optional[Job] = None
        self.models = None  # created on the compute thread (imports MLX libraries)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        threading.Thread(target=self._compute_loop, name="compute", daemon=True).start()
        threading.Thread(target=self._read_loop, name="reader", daemon=True).start()

    def stop(self, why: str) -> None:
        if self.stopping.is_set():
            return
        log.info("stopping: %s", why)
        with self.cond:
            self.stopping.set()
            queued = list(self.queue)
            self.queue.clear()
            for job in self.jobs.values():
                job.cancel.set()
            self.cond.notify_all()
        for job in queued:  # answered now, not after the active job ends
            self._answer_unstarted(job, shutting_down=True)

    def wait(self) -> int:
        """Block the main thread (so it can take signals) until stopped,
        then give in-flight work a moment to answer, flush, and return."""
        while not self.stopping.wait(0.2):
            pass
        deadline = time.monotonic() + 0.8
        # Requests already read (say, pipelined after `shutdown`) are answered
        # too: -32010 for queued work, a cancelled result for a generate.
        self.reader_idle.wait(max(0.0, deadline - time.monotonic()))
        with self.cond:
            self.cond.wait_for(lambda: self.active is None and not self.queue, max(0.0, deadline - time.monotonic()))
            unfinished = list(self.jobs.values())
        # Work that can't stop at once (a load, a tokenize, a long prefill
        # chunk) still gets its one response before the exit.
        for job in unfinished:
            if job.method == "generate":  # cancelled: its result carries what was streamed
                self._answer_with(job, lambda j=job: protocol.Response(id=j.id, result=j.cancelled_result()))
            else:
                self.answer_error(job, errors.SHUTTING_DOWN, "the worker is shutting down; the request did not finish in time")
        self.writer.flush(max(0.05, deadline - time.monotonic() + 0.2))
        return self.exit_code

    def notify(self, method: str, params: object) -> None:
        self.writer.send(protocol.Notification(method, params))

    def reply(self, id: Any, result: object) -> None:
        self.writer.send(protocol.Response(id=id, result=result))

    def answer(self, job: "Job", result: object) -> None:
        """A job's final response: sent once, whoever gets there first."""
        if self._claim(job):
            self.reply(job.id, result)

    def answer_error(self, job: "Job", code: int, message: str, data: Any = None) -> None:
        if self._claim(job):
            self.reply_error(job.id, code, message, data)

    def job_notify(self, job: "Job", method: str, params: object) -> None:
        """A job's event, unless its final response already went out."""
        with job.lock:
            if job.answered:
                return
            if isinstance(params, protocol.TokenEvent):
                job.record(params)
            self.notify(method, params)

    def _answer_with(self, job: "Job", make) -> None:
        # Claim and build the response under the job's lock: no event can
        # slip in between what the response says was streamed and the response.
        with job.lock:
            if job.answered:
                return
            job.answered = True
            self.writer.send(make())

    @staticmethod
    def _claim(job: "Job") -> bool:
        with job.lock:
            if job.answered:
                return False
            job.answered = True
            return True

    def reply_error(self, id: Any, code: int, message: str, data: Any = None) -> None:
        error = protocol.ErrorObject(code=code, message=message)
        if data is not None:
            error.data = data
        self.writer.send(protocol.ErrorResponse(id=id, error=error))

    # -------------------------------------------------------------- reading

    def _read_loop(self) -> None:
        try:
            # Lines keep being answered while the worker stops (queued work
            # gets -32010), so no request goes unanswered before the exit.
            idle = lambda yes: self.reader_idle.set() if yes else self.reader_idle.clear()  # noqa: E731
            for line in read_lines(self.in_fd, self.config.max_line_bytes, on_idle=idle):
                try:
                    self.handle_line(line)
                except Exception:  # a bug here must not end the reader
                    log.exception("failed to handle a line")
                    self.reply_error(None, errors.INTERNAL_ERROR, "internal error handling this line")
        finally:
            self.reader_idle.set()
            self.stop("stdin closed")

    def handle_line(self, line: bytes | Oversized) -> None:
        if isinstance(line, Oversized):
            rid = _id_at_head(line.head)
            self.reply_error(
                rid,
                errors.INVALID_REQUEST,
                f"line of {line.size} bytes exceeds max_line_bytes ({self.config.max_line_bytes}); skipped",
                {"max_line_bytes": self.config.max_line_bytes},
            )
            return
        if line.lstrip()[:1] == b"[":
            self.reply_error(None, errors.INVALID_REQUEST, "JSON-RPC batches are not supported; send one request per line")
            return
        try:
            # msgspec skips unknown keys without checking their UTF-8: check
            # the whole line, so invalid bytes are an error wherever they are.
            if not line.isascii():
                line.decode("utf-8")
            env = msgspec.json.decode(line, type=protocol.Envelope)
        except msgspec.ValidationError as exc:
            self.reply_error(None, errors.INVALID_REQUEST, f"invalid request: {exc}", _field_of(exc, ""))
            return
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
            self.reply_error(None, errors.PARSE_ERROR, f"parse error: {exc}")
            return

        is_notification = env.id is msgspec.UNSET
        rid = None if is_notification else env.id
        if env.jsonrpc != "2.0":
            return self._reject(is_notification, rid, errors.INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"', {"field": "jsonrpc"})
        if not isinstance(env.method, str):
            return self._reject(is_notification, rid, errors.INVALID_REQUEST, 'invalid request: "method" must be a string', {"field": "method"})
        types = protocol.METHODS.get(env.method)
        if types is None:
            return self._reject(is_notification, rid, errors.METHOD_NOT_FOUND, f"method not found: {env.method!r}", {"method": env.method})
        try:
            raw = env.params if env.params is not msgspec.UNSET else b"{}"
            params = msgspec.json.decode(raw, type=types[0])
        except msgspec.ValidationError as exc:
            message = str(exc).replace("`$", "`params")
            where = _field_of(exc, "params", raw)
            if "key" in where:
                message += f" (the key {where['key']!r})"
            return self._reject(is_notification, rid, errors.INVALID_PARAMS, f"invalid params: {message}", where)
        except (msgspec.DecodeError, RecursionError, ValueError) as exc:
            return self._reject(is_notification, rid, errors.INVALID_PARAMS, f"invalid params: {exc}", {"field": "params"})

        job = Job(rid, env.method, params)
        if not is_notification and rid in self.jobs:  # racy read is fine: ids only leave
            self.reply_error(rid, errors.INVALID_REQUEST, f"id {rid!r} is already in flight", {"field": "id"})
            return
        if env.method in IMMEDIATE:
            self._run_immediate(job, is_notification)
            return
        if is_notification:
            log.warning("ignoring %s sent as a notification (no id): it would have no reply", env.method)
            return
        self._enqueue(job)

    def _reject(self, is_notification: bool, rid: Any, code: int, message: str, data: Any) -> None:
        if is_notification:
            log.warning("dropping bad notification: %s", message)
        else:
            self.reply_error(rid, code, message, data)

    def _enqueue(self, job: Job) -> None:
        with self.cond:
            if self.stopping.is_set():
                error = (errors.SHUTTING_DOWN, "the worker is shutting down", None)
            elif job.id in self.jobs:
                error = (errors.INVALID_REQUEST, f"id {job.id!r} is already in flight", {"field": "id"})
            elif len(self.queue) >= self.config.max_pending:
                error = (errors.BUSY, f"queue is full ({self.config.max_pending} pending requests)", None)
            else:
                self.jobs[job.id] = job
                self.queue.append(job)
                self.cond.notify_all()
                return
        self.reply_error(job.id, *error)

    def _run_immediate(self, job: Job, is_notification: bool) -> None:
        if job.method == "cancel":
            result: Any = protocol.CancelResult(cancelled=self.cancel(job.params.id))
        elif job.method == "status":
            result = self.status()
        else:  # shutdown
            result = protocol.ShutdownResult(shutting_down=True)
        if not is_notification:
            self.reply(job.id, result)
        if job.method == "shutdown":
            self.stop("shutdown requested")

    # ------------------------------------------------------- cancel, status

    def cancel(self, rid: Any) -> bool:
        with self.cond:
            job = self.jobs.get(rid)
            if job is None or job.method not in CANCELLABLE:
                return False
            queued = job in self.queue
            if queued:
                self.queue.remove(job)
        with job.lock:
            if job.finished:
                return False
            job.cancel.set()
        if queued:  # never started: its final response goes out at once
            self._answer_unstarted(job, shutting_down=False)
        return True

    def _answer_unstarted(self, job: Job, shutting_down: bool) -> None:
        """Answer a job taken off the queue before it ran: a generate gets a
        cancelled result, anything else -32010."""
        job.cancel.set()
        self._retire(job)
        if job.method == "generate":
            self.answer(job, protocol.cancelled_result(job.params))
        elif job.method == "load" and not shutting_down:
            self.answer_error(job, errors.CANCELLED, "the load was cancelled before it started")
        else:
            self.answer_error(job, errors.SHUTTING_DOWN, "the worker is shutting down")

    def status(self) -> protocol.StatusResult:
        from .memory import memory_status

        models = self.models.snapshot() if self.models is not None else []
        with self.cond:
            active = self.active.id if self.active is not None else None
            pending = len(self.queue)
        return protocol.StatusResult(
            models=[m.describe() for m in models],
            queue=protocol.QueueStatus(active=active, pending=pending, max_pending=self.config.max_pending),
            memory=memory_status(),
            uptime_s=round(time.monotonic() - self.started, 3),
        )

    # -------------------------------------------------------------- compute

    def _compute_loop(self) -> None:
        try:
            from .handlers import Handlers

            handlers = Handlers(self)
            self.models = handlers.models
        except BaseException as exc:  # e.g. a broken install: answer, don't hang
            log.exception("the compute thread could not start")
            handlers = _Broken(f"the worker could not start its compute thread: {type(exc).__name__}: {exc}")
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.queue or self.stopping.is_set())
                if not self.queue:
                    self.active = None
                    self.cond.notify_all()
                    return
                job = self.active = self.queue.popleft()
            job.started = time.perf_counter()
            try:
                self._run_job(handlers, job)
            finally:
                self._retire(job)
                with self.cond:
                    self.active = None
                    self.cond.notify_all()

    def _run_job(self, handlers, job: Job) -> None:
        try:
            if self.stopping.is_set() and job.method != "generate":
                raise WorkerError(errors.SHUTTING_DOWN, "the worker is shutting down")
            result = handlers.dispatch(job)
        except WorkerError as exc:
            self._retire(job)
            self.answer_error(job, exc.code, exc.message, exc.data)
            return
        except BaseException as exc:  # a Rust panic from a library is a BaseException
            self._retire(job)
            code, message = errors.classify_exception(exc)
            if code == errors.INTERNAL_ERROR:
                log.exception("%s failed", job.method)
            self.answer_error(job, code, message)
            return
        self._retire(job)
        self.answer(job, result)

    def _retire(self, job: Job) -> None:
        # Before the reply is queued: a host may reuse the id the moment the
        # reply reaches it, and must not be told the id is still in flight.
        with job.lock:
            job.finished = True
        with self.cond:
            if self.jobs.get(job.id) is job:
                del self.jobs[job.id]


class _Broken:
    """Stands in for the handlers when they could not be created."""

    def __init__(self, why: str):
        self.why = why

    def dispatch(self, job: Job) -> Any:
        raise WorkerError(errors.INTERNAL_ERROR, self.why)


def _id_at_head(head: bytes) -> Any:
    """The request's own ``id`` from the first bytes of an oversized line,
    or None. Only a key of the top-level object counts: an "id" nested in
    params (a tool call's, a schema's) must not be taken for it."""
    depth, i, n = 0, 0, len(head)
    while i < n:
        c = head[i]
        if c == 0x22:  # a string: skip it whole, escapes included
            j = i + 1
            while j < n and head[j] != 0x22:
                j += 2 if head[j] == 0x5C else 1
            if j >= n:
                return None
            if depth == 1 and head[i : j + 1] == b'"id"':
                match = _ID_VALUE.match(head, j + 1)
                if match:
                    try:
                        return msgspec.json.decode(match.group(1))
                    except (msgspec.DecodeError, UnicodeDecodeError):
                        return None
            i = j + 1
            continue
        if c in (0x5B, 0x7B):
            depth += 1
        elif c in (0x5D, 0x7D):
            depth -= 1
        i += 1
    return None


def _field_of(exc: msgspec.ValidationError, root: str, raw: bytes = b"") -> dict:
    # msgspec says "... - at `$.a.b[0]`" (or "at `key` in `$.a`" for a
    # mapping's key); hosts get it as "params.a.b[0]". An unknown field and a
    # bad mapping key are named themselves ("params.max_tokenz",
    # "params.logit_bias.1_0"), so a host sees exactly what it got wrong.
    text = str(exc)
    match = re.search(r"`\$([^`]*)`$", text)
    path = match.group(1) if match else ""
    unknown = re.match(r"Object contains unknown field `([^`]*)`", text)
    if unknown:
        path += "." + unknown.group(1)
    elif " - at `key` in `$" in text:
        key = _bad_key(raw, path, text)
        if key is not None:
            return {"field": f"{root}{path}.{key}", "key": key}
    return {"field": root + path if root else path.lstrip(".")}


def _bad_key(raw: bytes, path: str, message: str) -> Optional[str]:
    """The first key of the mapping at ``path`` that breaks the pattern
    msgspec reports (its error names the mapping, not the key)."""
    pattern = re.search(r"matching regex '([^']*)'", message)
    try:
        mapping = msgspec.json.decode(raw)
        for part in filter(None, path.split(".")):
            mapping = mapping[part]
    except (msgspec.DecodeError, KeyError, TypeError):
        return None
    if not isinstance(mapping, dict) or pattern is None:
        return None
    return next((k for k in mapping if not re.search(pattern.group(1), k)), None)

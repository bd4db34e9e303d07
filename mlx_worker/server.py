"""Requests in, responses out: validation, routing, the queue, cancel.

Three threads: the reader decodes stdin lines and answers what must not wait
(``cancel``, ``status``, ``shutdown``, every validation error); the compute
thread runs everything that touches MLX: jobs in arrival order, and the
scheduler that steps every running generation together (scheduler.py); the
job table (jobs.py) owns each request's lifecycle; the writer (transport.LineWriter) serializes output.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import msgspec

from . import errors, protocol
from .jobs import Job, JobTable
from .transport import LineWriter, Oversized, read_lines

log = logging.getLogger("mlx_worker.server")

# Jobs taken one after another before the running generations step again.
BURST = 16

# Answered on the reader thread, never queued behind a generation.
IMMEDIATE = {"cancel", "status", "shutdown"}

# After a top-level "id" key: a whole integer or string, then `,` or `}`.
_ID_VALUE = re.compile(rb'\s*:\s*(-?\d{1,18}|"(?:[^"\\]|\\.){0,200}")\s*[,}]')


@dataclass
class Config:
    max_line_bytes: int = 8 * 1024 * 1024
    max_pending: int = 64
    blas: Optional[str] = None
    memory_limit: Optional[int] = None


SPILL_WAIT_S = 20.0  # at shutdown: longest wait for the prompt cache's disk writes

class Worker:
    def __init__(self, in_fd: int, out_fd: int, config: Config):
        self.config = config
        self.in_fd = in_fd
        self.started = time.monotonic()
        self.stopping = threading.Event()
        self.compute_done = threading.Event()  # the compute thread ended (disk tier written)
        self.reader_idle = threading.Event()  # every line read so far is handled
        self.exit_code = 0
        self.writer = LineWriter(out_fd, on_broken=lambda: self.stop("stdout closed"))
        self.table = JobTable(self.writer.send, config.max_pending)
        self.models = None  # created on the compute thread (imports MLX libraries)
        self.handlers = None  # likewise

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        threading.Thread(target=self._compute_loop, name="compute", daemon=True).start()
        threading.Thread(target=self._read_loop, name="reader", daemon=True).start()

    def stop(self, why: str) -> None:
        if self.stopping.is_set():
            return
        log.info("stopping: %s", why)
        self.stopping.set()
        self.table.stop()  # queued work is answered now, running work is cancelled

    def wait(self) -> int:
        """Block the main thread (so it can take signals) until stopped,
        then give in-flight work a moment to answer, flush, and return."""
        while not self.stopping.wait(0.2):
            pass
        deadline = time.monotonic() + 0.8
        # Requests already read (say, pipelined after `shutdown`) are answered
        # too: -32010 for queued work, a cancelled result for a generate.
        self.reader_idle.wait(max(0.0, deadline - time.monotonic()))
        self.table.wait_idle(deadline - time.monotonic())
        # Work that can't stop at once (a load, a tokenize, a long prefill
        # chunk) still gets its one response before the exit.
        handlers = self.handlers
        self.table.answer_leftovers(lambda job: handlers.generates.partial_result(job) if handlers is not None else None)
        from .cache.disk import all_tiers

        if all_tiers():  # entries still in RAM are written before the exit (bounded)
            self.compute_done.wait(SPILL_WAIT_S)
        self.writer.flush(max(0.05, deadline - time.monotonic() + 0.2))
        return self.exit_code

    def notify(self, method: str, params: object) -> None:
        self.writer.send(protocol.Notification(method, params))

    def reply(self, id: Any, result: object) -> None:
        self.writer.send(protocol.Response(id=id, result=result))

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
                    rid = _id_at_head(line.head if isinstance(line, Oversized) else bytes(line))
                    self.reply_error(rid, errors.INTERNAL_ERROR, "internal error handling this line")
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
        if not is_notification and self.table.in_flight(rid):
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
        refused = self.table.add(job)
        if refused is not None:
            self.reply_error(job.id, *refused)

    def _run_immediate(self, job: Job, is_notification: bool) -> None:
        if job.method == "cancel":
            result: Any = protocol.CancelResult(cancelled=self.table.cancel(job.params.id))
        elif job.method == "status":
            result = self.status()
        else:  # shutdown
            result = protocol.ShutdownResult(shutting_down=True)
        if not is_notification:
            self.reply(job.id, result)
        if job.method == "shutdown":
            self.stop("shutdown requested")

    # ------------------------------------------------------------- status

    def status(self) -> protocol.StatusResult:
        from .cache.disk import all_tiers
        from .memory import memory_status  # late: `status` may come before the compute thread imported MLX

        models = self.models.snapshot() if self.models is not None else []
        waiting = self.handlers.scheduler.waiting_ids() if self.handlers is not None else []
        running = [rid for rid in self.table.running_ids() if rid not in waiting]
        return protocol.StatusResult(
            models=[m.describe() for m in models],
            queue=protocol.QueueStatus(
                active=running[0] if running else None,
                pending=self.table.pending(),
                max_pending=self.config.max_pending,
                running=running,
                waiting=waiting,
            ),
            memory=memory_status(models),
            uptime_s=round(time.monotonic() - self.started, 3),
            distributed=_distributed(),
            disk_cache=[t.status() for t in all_tiers()],
        )

    # -------------------------------------------------------------- compute

    def _compute_loop(self) -> None:
        """Everything that touches MLX, on this one thread: queued jobs are
        taken in arrival order; a generate joins the scheduler, which steps
        every running generation between jobs."""
        try:
            from .handlers import Handlers  # late: imports MLX (after `ready`)

            handlers = Handlers(self.table)
            self.models = handlers.models
            self.handlers = handlers
        except BaseException as exc:  # e.g. a broken install: answer, don't hang
            log.exception("the compute thread could not start")
            handlers = _Broken(self.table, f"the worker could not start its compute thread: {type(exc).__name__}: {exc}")
        taken = 0
        while True:
            busy = handlers.busy()
            job = self.table.take(wait=not busy)
            if job is None and not busy:
                if self.stopping.is_set():
                    try:  # the prompt cache's entries go to its disk tier (if any) before the exit
                        getattr(handlers, "close", lambda: None)()
                    except BaseException:
                        log.exception("writing the prompt cache to disk at shutdown failed")
                    self.compute_done.set()
                    return
                continue
            if job is not None:
                try:
                    handlers.run(job)
                except BaseException as exc:  # last resort: this thread serves every model
                    log.exception("a job failed outside its handler")
                    self.table.fail(job, errors.INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}")
                taken += 1
                if taken < BURST and self.table.pending():
                    continue  # requests that arrived together start together
            taken = 0
            if handlers.busy():
                try:
                    handlers.step()
                except BaseException as exc:  # last resort: end what the scheduler held, go on
                    log.exception("a scheduler step failed outside its guard")
                    try:
                        handlers.scheduler.fail_all(exc)
                    except BaseException:
                        log.exception("could not end the requests the scheduler held")


def _distributed():
    import sys

    if "mlx_worker.distributed.load" not in sys.modules:  # no distributed load yet: nothing to report
        from .distributed.ring import BACKENDS

        return protocol.DistributedCapabilities(backends=list(BACKENDS))
    return sys.modules["mlx_worker.distributed.load"].capabilities()


class _Broken:
    """Stands in for the handlers when they could not be created."""

    def __init__(self, table: JobTable, why: str):
        self.table = table
        self.why = why

    def busy(self) -> bool:
        return False

    def step(self) -> None:
        pass

    def run(self, job: Job) -> None:
        self.table.fail(job, errors.INTERNAL_ERROR, self.why)


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

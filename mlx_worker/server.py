"""Requests in, responses out: routing, the queue, cancel, ``status``.

The reader thread decodes stdin lines (request_lines.py) and answers what must
not wait (``cancel``, ``status``, ``shutdown``, every validation error); the
compute thread runs the methods layer (methods.py) and its scheduler; the
job table (jobs.py) owns each request's one answer; the writer
(transport.LineWriter) serializes output. Spec: protocol/README.md § Framing, § Ordering and concurrency.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from . import errors, mlx_stuck, protocol, request_lines, token_merging
from .jobs import Job, JobTable
from .request_lines import Rejected
from .transport import LineWriter, Oversized, read_lines

log = logging.getLogger("mlx_worker.server")

# Jobs taken one after another before the running generations step again.
BURST = 16

# Answered on the reader thread, never queued behind a generation.
IMMEDIATE = {"cancel", "status", "shutdown"}

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
        self.writer = LineWriter(out_fd, on_broken=lambda: self.stop("stdout closed"),
                                 coalesce=token_merging.coalesce)
        self.table = JobTable(self.writer.send, config.max_pending)
        self.models = None  # created on the compute thread (imports MLX libraries)
        # The methods layer (methods.py), once the compute thread created it.
        self.methods: Any = _Unavailable(self.table, "the worker is starting")

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        mlx_stuck.on_declare(self.stuck)
        threading.Thread(target=self._compute_loop, name="compute", daemon=True).start()
        threading.Thread(target=self._read_loop, name="reader", daemon=True).start()

    def stuck(self, why: str) -> None:
        """The compute thread is stuck in MLX for good (mlx_stuck.py): every
        request in flight is answered from here, then the worker stops."""
        self.exit_code = mlx_stuck.EXIT_CODE
        message = f"{why}; the worker exits (code {mlx_stuck.EXIT_CODE}): restart it"
        for job in self.table.snapshot()[1]:  # the taken ones; queued ones get -32010 from stop
            self.table.fail(job, errors.GENERATION_FAILED, message)
        self.stop(why)

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
        generates = getattr(self.methods, "generates", None)
        self.table.answer_leftovers(lambda job: generates.partial_result(job) if generates is not None else None)
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
        self.writer.send(protocol.error_response(id, code, message, data))

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
                    rid = request_lines.id_at_head(line.head if isinstance(line, Oversized) else bytes(line))
                    self.reply_error(rid, errors.INTERNAL_ERROR, "internal error handling this line")
        finally:
            self.reader_idle.set()
            self.stop("stdin closed")

    def handle_line(self, line: bytes | Oversized) -> None:
        request = request_lines.decode(line, self.config.max_line_bytes)
        if isinstance(request, Rejected):
            if request.notification:
                log.warning("dropping bad notification: %s", request.message)
            else:
                self.reply_error(request.id, request.code, request.message, request.data)
            return
        job = Job(request.id, request.method, request.params)
        if not request.notification and self.table.in_flight(request.id):
            self.reply_error(request.id, errors.INVALID_REQUEST, f"id {request.id!r} is already in flight", {"field": "id"})
            return
        if request.method in IMMEDIATE:
            self._run_immediate(job, request.notification)
            return
        if request.notification:
            log.warning("ignoring %s sent as a notification (no id): it would have no reply", request.method)
            return
        self._enqueue(job)

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
        scheduler = getattr(self.methods, "scheduler", None)
        queued, taken = self.table.snapshot()
        waiting = scheduler.waiting_ids() if scheduler is not None else []
        running = [job.id for job in taken if job.id not in waiting]
        return protocol.StatusResult(
            models=[self.models.describe(m) for m in models],
            queue=protocol.QueueStatus(
                active=running[0] if running else None,
                pending=len(queued),
                max_pending=self.config.max_pending,
                running=running,
                waiting=waiting,
            ),
            memory=memory_status(models),
            uptime_s=round(time.monotonic() - self.started, 3),
            distributed=self.methods.distributed_capabilities(),
            disk_cache=[t.status() for t in all_tiers()],
            requests=_request_statuses(queued, taken, scheduler),
        )

    # -------------------------------------------------------------- compute

    def _compute_loop(self) -> None:
        """Everything that touches MLX, on this one thread: queued jobs are
        taken in arrival order; a generate joins the scheduler, which steps
        every running generation between jobs."""
        try:
            from .methods import Methods  # late: imports MLX (after `ready`)

            methods = Methods(self.table)
            self.models = methods.models
        except BaseException as exc:  # e.g. a broken install: answer, don't hang
            log.exception("the compute thread could not start")
            methods = _Unavailable(self.table, f"the worker could not start its compute thread: {type(exc).__name__}: {exc}")
        self.methods = methods
        taken = 0
        while True:
            busy = methods.busy()
            job = self.table.take(wait=not busy)
            if job is None and not busy:
                if self.stopping.is_set():
                    try:  # the prompt cache's entries go to its disk tier (if any) before the exit
                        getattr(methods, "close", lambda: None)()
                    except BaseException:
                        log.exception("writing the prompt cache to disk at shutdown failed")
                    self.compute_done.set()
                    return
                continue
            if job is not None:
                try:
                    methods.run(job)
                except BaseException as exc:  # last resort: this thread serves every model
                    log.exception("a job failed outside its handler")
                    self.table.fail(job, errors.INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}")
                taken += 1
                if taken < BURST and self.table.pending():
                    continue  # requests that arrived together start together
            taken = 0
            if methods.busy():
                try:
                    methods.step()
                except BaseException as exc:  # last resort: end what the scheduler held, go on
                    log.exception("a scheduler step failed outside its guard")
                    try:
                        methods.scheduler.fail_all(exc)
                    except BaseException:
                        log.exception("could not end the requests the scheduler held")


class _Unavailable:
    """Stands in for the methods layer until it exists, or when it could not be created."""

    def __init__(self, table: JobTable, why: str):
        self.table = table
        self.why = why

    def busy(self) -> bool:
        return False

    def step(self) -> None:
        pass

    def run(self, job: Job) -> None:
        self.table.fail(job, errors.INTERNAL_ERROR, self.why)

    def distributed_capabilities(self) -> protocol.DistributedCapabilities:
        from .distributed import ring  # no MLX: the backends this build can start, no group yet

        return ring.capabilities()


def _request_statuses(queued: list[Job], taken: list[Job], scheduler) -> list[protocol.RequestStatus]:
    """Each generate in flight (taken ones oldest first, then queued ones):
    its lifecycle state (the scheduler's, once it holds a taken one; else
    queued) and priority. Read from the reader thread, after the table's
    snapshot: a job queued in it reads "queued" even if taken since."""
    held = dict(scheduler.requests) if scheduler is not None else {}
    paused = {r.request_id for r in scheduler.preemption.requests()} if scheduler is not None else set()
    out = []
    for jobs, is_taken in ((taken, True), (queued, False)):
        for job in [j for j in jobs if j.method == "generate"]:
            req = held.get(job.id) if is_taken else None
            out.append(protocol.RequestStatus(id=job.id, state=req.state.value if req is not None else "queued",
                                              priority=job.params.priority, paused=job.id in paused))
    return out

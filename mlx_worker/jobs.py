"""The job table: every request read, from queueing to its one final response.

It owns a request's id while in flight, the queue, the cancel flag and the
promise of exactly one final response (no event after it). The reader thread
adds and cancels jobs; the compute thread takes them and hands back results
or errors. A cancelled generate answers ``stop_reason: "cancelled"``: the
table answers a queued one, the engine a running one. Spec: "`cancel`".
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from . import errors, protocol
from .engine import result as generate_result
from .errors import WorkerError

log = logging.getLogger("mlx_worker.jobs")

# Methods `cancel` applies to. A long phase of any job polls
# ``job.should_stop`` (set by cancel and at shutdown); adding a method here
# (a cancellable `load`, say) is all the table needs.
CANCELLABLE = {"generate", "load", "embed"}  # a generate ends "cancelled", a load or an embed with -32012


@dataclass(eq=False)  # a job is itself: `in queue` compares identity
class Job:
    id: Any
    method: str
    params: Any
    received: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    # Set by cancel and at shutdown; long phases poll ``should_stop``.
    cancel: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _finished: bool = False  # no longer cancellable
    _answered: bool = False  # its one final response is out (or being sent)

    def should_stop(self) -> bool:
        return self.cancel.is_set()


class JobTable:
    def __init__(self, send: Callable[[object], None], max_pending: int):
        self._send = send
        self.max_pending = max_pending
        self.cond = threading.Condition()
        self.jobs: dict[Any, Job] = {}  # every request in flight: queued or running
        self.queue: collections.deque[Job] = collections.deque()
        self.running: dict[Any, Job] = {}  # taken by the compute thread, not yet answered
        self.stopping = False

    # ------------------------------------------------------------ queueing

    def in_flight(self, rid: Any) -> bool:
        with self.cond:
            return rid in self.jobs

    def add(self, job: Job) -> Optional[tuple]:
        """Queue a job; or the (code, message, data) it is refused with."""
        with self.cond:
            if self.stopping:
                return (errors.SHUTTING_DOWN, "the worker is shutting down", None)
            if job.id in self.jobs:
                return (errors.INVALID_REQUEST, f"id {job.id!r} is already in flight", {"field": "id"})
            if len(self.queue) >= self.max_pending:
                return (errors.BUSY, f"queue is full ({self.max_pending} pending requests)", None)
            self.jobs[job.id] = job
            self.queue.append(job)
            self.cond.notify_all()
            return None

    def take(self, wait: bool) -> Optional[Job]:
        """The next queued job (None when there is none, or when stopping and
        ``wait`` found nothing). Marks it running."""
        with self.cond:
            if wait:
                self.cond.wait_for(lambda: self.queue or self.stopping)
            if not self.queue:
                return None
            job = self.queue.popleft()
            self.running[job.id] = job
            job.started = time.perf_counter()
            return job

    def wait_for_work(self, timeout: float, also: Callable[[], bool] = lambda: False) -> None:
        """Until a job is queued, the worker stops, ``also()`` holds (checked
        when ``poke`` is called), or ``timeout``."""
        with self.cond:
            self.cond.wait_for(lambda: self.queue or self.stopping or also(), timeout)

    def poke(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def wait_idle(self, timeout: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: not self.queue and not self.running, max(0.0, timeout))

    def snapshot(self) -> tuple[list[Job], list[Job]]:
        """(queued, taken) jobs at one moment: ``status`` builds its queue and
        its requests' states from one view, so they never disagree."""
        with self.cond:
            return list(self.queue), list(self.running.values())

    def running_job(self, rid: Any) -> Optional[Job]:
        with self.cond:
            return self.running.get(rid)

    def pending(self) -> int:
        with self.cond:
            return len(self.queue)

    # -------------------------------------------------------------- cancel

    def cancel(self, rid: Any) -> bool:
        """``cancel {id}``: True promises a cancelled final response."""
        with self.cond:
            job = self.jobs.get(rid)
            if job is None or job.method not in CANCELLABLE:
                return False
            queued = job in self.queue
            if queued:
                self.queue.remove(job)
        with job._lock:
            if job._finished:
                return False
            job.cancel.set()
        if queued:  # never started: its final response goes out at once
            self._answer_unstarted(job, shutting_down=False)
        return True

    def close_cancel(self, job: Job) -> bool:
        """The job's work is done and can no longer be cancelled; whether a
        cancel came first (its answer must then say so)."""
        with job._lock:
            job._finished = True
            return job.cancel.is_set()

    def stop(self) -> None:
        """Shutdown: every job is cancelled; queued ones are answered now."""
        with self.cond:
            if self.stopping:
                return
            self.stopping = True
            queued = list(self.queue)
            self.queue.clear()
            for job in self.jobs.values():
                job.cancel.set()
            self.cond.notify_all()
        for job in queued:
            self._answer_unstarted(job, shutting_down=True)

    def answer_leftovers(self, partial: Callable[[Job], Optional[protocol.GenerateResult]]) -> None:
        """At exit: whatever could not stop in time still gets its response
        (a generate: ``partial``, its cancelled result from what it streamed)."""
        with self.cond:
            unfinished = list(self.jobs.values())
        for job in unfinished:
            if job.method == "generate":  # cancelled (stop set the flag); built as it is answered
                job.cancel.set()
                self._answer(job, lambda job=job: protocol.Response(id=job.id, result=_leftover(job, partial)))
            else:
                self.fail(job, errors.SHUTTING_DOWN, "the worker is shutting down; the request did not finish in time")

    def _answer_unstarted(self, job: Job, shutting_down: bool) -> None:
        job.cancel.set()
        if job.method == "generate":
            self.finish(job, generate_result.cancelled(job.params))
        elif job.method in ("load", "embed") and not shutting_down:
            self.fail(job, errors.CANCELLED, f"the {job.method} was cancelled before it started")
        else:
            self.fail(job, errors.SHUTTING_DOWN, "the worker is shutting down")

    # ------------------------------------------------------------- answers

    def notify(self, job: Job, method: str, params: object,
               sent: Optional[Callable[[object], None]] = None) -> None:
        """A job's event, unless its final response already went out;
        ``sent(params)`` once it went out, under the job's lock (so a final
        response built meanwhile sees either both or neither)."""
        with job._lock:
            if job._answered:
                return
            self._send(protocol.Notification(method, params))
            if sent is not None:
                sent(params)

    def finish(self, job: Job, result: object) -> None:
        self._answer(job, lambda: protocol.Response(id=job.id, result=result))

    def fail(self, job: Job, code: int, message: str, data: Any = None) -> None:
        self._answer(job, lambda: protocol.error_response(job.id, code, message, data))

    def finish_with(self, job: Job, outcome: object) -> None:
        """Any other method's end: its result or the exception it raised."""
        if isinstance(outcome, BaseException):
            self._answer(job, lambda: _error_response(job, outcome))
        else:
            self.finish(job, outcome)

    def _answer(self, job: Job, make: Callable[[], object]) -> None:
        # Retire the id before the reply is queued: a host may reuse it the
        # moment the reply reaches it. Claim and build the response under the
        # job's lock: no event slips in between what it says was streamed and it.
        with job._lock:
            if job._answered:
                return
            job._finished = job._answered = True
            with self.cond:
                if self.jobs.get(job.id) is job:
                    del self.jobs[job.id]
                if self.running.get(job.id) is job:
                    del self.running[job.id]
                self.cond.notify_all()
            self._send(make())


def _leftover(job: Job, partial: Callable[[Job], Optional[protocol.GenerateResult]]) -> protocol.GenerateResult:
    queue_ms = generate_result.queue_ms(job.received, job.started or job.received)
    return partial(job) or generate_result.cancelled(job.params, queue_ms=queue_ms)


def _error_response(job: Job, exc: BaseException) -> protocol.ErrorResponse:
    if isinstance(exc, WorkerError):
        code, message, data = exc.code, exc.message, exc.data
    else:  # a Rust panic from a library is a BaseException
        code, message = errors.classify_exception(exc)
        data = None
        if code == errors.INTERNAL_ERROR:
            log.error("%s failed", job.method, exc_info=exc)
    return protocol.error_response(job.id, code, message, data)

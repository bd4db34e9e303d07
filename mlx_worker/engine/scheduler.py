"""The scheduler: which request runs when; all running ones stepped together.

One table of requests by id, each moved through its states (request.py).
Each ``step``: at most one prefill turn (prefill_turns.py), then one decode
step of every decode group (batch.py, speculative.py). Admission:
admission.py; preemption: preemption.py; forward passes: runner.py. It
answers through its ``done`` callback only. Spec: "Batching", "Memory limits".
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable, Optional

import mlx.core as mx

from .. import errors, memory
from ..errors import WorkerError
from . import draft_batch, priority, runner
from .admission import Admission
from .batch import DecodeGroups
from .preemption import Preemption
from .prefill_turns import PrefillTurns, prefills
from .request import Request, RequestState

log = logging.getLogger("mlx_worker.engine.scheduler")

# (request, outcome) -> None: a GenerateResult or the exception it ended with.
Done = Callable[[Request, object], None]


class Scheduler:
    def __init__(self, done: Done, beside: "Scheduler | None" = None):
        self.done = done
        # run_alone: the main scheduler, whose requests are paused meanwhile
        # but still hold (and may still need) their memory.
        self.beside = beside
        self.requests: dict = {}  # request id -> Request: every request held, in any state
        self.waiting: collections.deque[Request] = collections.deque()  # not admitted yet
        self.turns = PrefillTurns()
        self.prefilling = self.turns.queue  # admitted, prompt not yet through
        self.decode = DecodeGroups()
        self.admission = Admission(self)
        self.preemption = Preemption(self)
        self._admissions = 0

    def busy(self) -> bool:
        return bool(self.requests)

    def decoding(self) -> int:
        return len(self.decode)

    def running(self) -> list[Request]:
        """The admitted requests that are not paused."""
        out = list(self.prefilling)
        for g in self.decode.all():
            out.extend(g.rows)
        return out

    def waiting_ids(self) -> list:
        """Ids of the requests waiting for memory (``status``; any thread)."""
        return [r.request_id for r in list(self.requests.values()) if r.state is RequestState.WAITING_MEMORY]

    def holds(self, lm) -> bool:
        return any(r.lm is lm or r.draft_lm is lm for r in list(self.requests.values()))

    # ------------------------------------------------------------- submit

    def submit(self, req: Request) -> None:
        """Prepare and admit a new request (or answer it: error, cancelled)."""
        if not self.busy() and not (self.beside and self.beside.busy()):
            memory.reset_peak()  # never mid-batch: the running requests report the peak
        self.requests[req.request_id] = req
        req.state = RequestState.PREPARING
        req.memory_base = mx.get_active_memory()
        try:
            req.prepare()
            req.open()
        except BaseException as exc:
            self.fail(req, exc)
            return
        self._admit_or_wait(req, first=True)

    def _admit_or_wait(self, req: Request, first: bool) -> bool:
        try:
            if first and priority.behind(self.waiting, req):
                # Requests start in arrival order within a priority: behind
                # the ones already waiting for memory (a stream of small
                # requests must not starve a big one), unless it never fits.
                self.admission.never_fits(req)
                self._wait(req)
                return False
            fits = self.admission.fits(req)
        except WorkerError as exc:
            self.fail(req, exc)
            return True
        if fits:
            self._start(req)
            return True
        if first:
            log.info("request waits for memory: %d bytes", req.need)
            self._wait(req)
        return False

    def _wait(self, req: Request) -> None:
        priority.enqueue(self.waiting, req)  # interactive ahead of background
        req.state = RequestState.WAITING_MEMORY
        req.memory_base = None  # measured again when admitted

    def _start(self, req: Request) -> None:
        self._admissions += 1
        req.admitted = self._admissions
        self.admission.track(req)
        if prefills(req):
            req.state = RequestState.PREFILLING
            self.prefilling.append(req)
        else:
            self._to_decode(req)

    def _to_decode(self, req: Request) -> None:
        req.state = RequestState.DECODING
        if req.max_tokens == 0:
            try:
                runner.prime(req)
                req.accept(0, None)
            except BaseException as exc:
                self.fail(req, exc, streamed=False)
                return
            self.finish(req, "cancelled" if req.should_stop() else "max_tokens")
            return
        draft = req.plan.draft
        if draft is not None:  # speculative: with its pair's others, else a group of its own
            _place(self, req)
            return
        _join(self, req)

    # --------------------------------------------------------------- step

    def step(self) -> None:
        self._end_cancelled()
        if self.preemption.paused:
            self.preemption.resume()
        if self.waiting:
            self._retry_waiting()
        if self.decoding() > 1:
            self.preemption.preempt()
        ride = None  # prompt chunks riding along in a decode step (prefill_turns.Ride)
        if self.prefilling and not priority.background_waits(self.prefilling, self.decode.all()):
            ride = self._prefill_turn()
        t0 = time.perf_counter()
        ended, stepped = self.decode.step(ride)
        for req, outcome, cache in ended:
            if isinstance(outcome, str):
                self.finish(req, outcome, cache)
            else:
                self.fail(req, outcome)
        for req, _ in ride.chunks if ride is not None else []:
            if all(req is not r for r, _, _ in ended):  # a rider ends only when its pass failed
                self._after_chunk(req)
        if stepped:
            self.turns.stepped(time.perf_counter() - t0, ride)

    def _end_cancelled(self) -> None:
        """The one cancel check of the requests not in a decode group (a
        decoding row's is its decoder's, paused ones' at resume): a cancel
        takes effect at the next step, wherever the request waits."""
        for queue in (self.waiting, self.prefilling):
            for req in [r for r in queue if r.should_stop()]:
                queue.remove(req)
                self.finish(req, "cancelled")

    def _retry_waiting(self) -> None:
        while self.waiting:
            req = self.waiting.popleft()
            if not self._admit_or_wait(req, first=False):
                self.waiting.appendleft(req)
                return  # in arrival order

    def _prefill_turn(self):
        """The next prompt chunks: a pass of their own, or returned to ride along (prefill_turns.Ride)."""
        ride, exc = self.turns.ride(self.decode.batches)
        if ride is not None and exc is None:
            return ride
        together, exc = ([r for r, _ in ride.chunks], exc) if ride is not None else self.turns.run_one(self.decoding())
        for r in together:
            if exc is not None:
                self.fail(r, exc)
            else:
                self._after_chunk(r)
        return None

    def _after_chunk(self, req: Request) -> None:
        if prefills(req):
            self.prefilling.append(req)  # the next prompt's turn
        elif req.should_stop():
            self.finish(req, "cancelled")
        else:
            self._to_decode(req)

    # ------------------------------------------------------------- finish

    def finish(self, req: Request, reason: str, cache: Optional[list] = None) -> None:
        """The one end of a request with a stop reason: a cancel answered
        true wins (``close_cancel``); ``cache``: its own KV out of a decode
        group (else the one it holds), committed to the prompt cache."""
        cancelled = req.close_cancel()
        if cancelled:
            reason = "cancelled"
        try:
            outcome: object = req.finish(reason, cache)
        except BaseException as exc:
            _abort(req)
            outcome = req.cancelled_result() if cancelled else exc
        self._answer(req, outcome)

    def fail(self, req: Request, exc: BaseException, streamed: bool = True) -> None:
        """End a request with an error (a cancelled one with its cancelled
        result): its answer goes out even if giving back what it held fails
        (say, a distributed group that just died). ``streamed``: an
        allocation failure reports what the request streamed (-32005)."""
        try:
            _abort(req)
        finally:
            error = _memory_error(exc, req) if streamed else exc
            self._answer(req, req.cancelled_result() if req.close_cancel() else error)

    def _answer(self, req: Request, outcome: object) -> None:
        req.state = RequestState.FINISHED
        if self.requests.get(req.request_id) is req:
            del self.requests[req.request_id]
        memory.untrack(req.request_id)
        self.done(req, outcome)

    def fail_all(self, exc: BaseException) -> None:
        """A bug in the scheduler itself: every request in its table ends
        with the error (a cancelled one with its cancelled result); it starts over."""
        held = list(self.requests.values())
        self.preemption.drop_all()
        self.waiting.clear()
        self.prefilling.clear()
        self.decode.clear()
        for req in held:
            try:
                self.fail(req, exc, streamed=False)
            except BaseException:  # one answer that fails must not cost the others theirs
                log.exception("could not answer a request the scheduler held")


def _place(s: Scheduler, req: Request) -> None:
    for gen, exc in draft_batch.place(s.decode, req):  # a join that failed: that request only
        s.fail(gen, exc)


def _join(s: Scheduler, req: Request) -> None:
    try:  # a vision row's first step runs as it joins (batch.py)
        s.decode.group_for(req.lm.model, req.batchable).join(req)
    except BaseException as exc:  # that request only: the group is as it was (an allocation failure: -32005)
        s.fail(req, exc)


def _abort(req: Request) -> None:
    try:
        req.abort()
    except BaseException:  # Request.abort shouldn't raise; the answer matters more
        log.exception("giving back a failed request's resources failed")


def _memory_error(exc: BaseException, req: Request) -> BaseException:
    """An allocation failure ends this request only: -32005 with what it streamed."""
    if isinstance(exc, MemoryError):
        dec = req.decoder
        return WorkerError(errors.OUT_OF_MEMORY, f"out of memory during generation: {exc}",
                           {"text": dec.text if dec else "", "tokens": list(dec.generated) if dec else []})
    return exc


def run_alone(req: Request, beside: "Scheduler | None" = None) -> object:
    """Drive one request to its end outside the shared batch (cache_save's
    prefill): the same phases, chunks and cancel checks, admitted beside
    ``beside``'s requests (paused meanwhile). Returns its result or the
    exception it ended with."""
    outcome: list = []
    alone = Scheduler(lambda r, o: outcome.append(o), beside)
    alone.submit(req)
    while alone.busy() and not outcome:
        alone.step()
    return outcome[0]


def run(lm, params, request_id, events, should_stop) -> object:
    """One generate, alone, in-process (benchmarks): its result, or raises."""
    outcome = run_alone(Request(lm, params, request_id, events, should_stop))
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome

"""The ``generate`` method: a job becomes an engine request; its one answer
goes back to the job table.

The prompt is prepared here within the compute thread's short bounds, else
on the prompt thread (offload.py), then the request is handed to the
scheduler, which answers through ``done``. Spec: "`generate`", "`cancel`".
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from . import errors, prompt_bounds, protocol
from .engine import result as generate_result, speculative
from .engine.request import Events, Request
from .engine.scheduler import Scheduler
from .errors import WorkerError
from .jobs import Job, JobTable
from .offload import Offload, Task


class Generates:
    def __init__(self, table: JobTable, model: Callable[[Any], Any], offload: Offload):
        self.table = table
        self.model = model  # a loaded model a new generate may use (Methods._model)
        self.offload = offload
        self.scheduler = Scheduler(self.done)

    def events(self, job: Job) -> Events:
        """Callbacks that send a request's progress and token notifications."""
        notify = self.table.notify
        return Events(progress=lambda e: notify(job, "progress", e),
                      token=lambda e, sent: notify(job, "token", e, sent))

    def start(self, job: Job) -> None:
        try:
            lm = self.model(job.params.model_id)
            if lm.kind == "embedding":
                raise errors.invalid_params("params.model_id", f"model {lm.model_id!r} is loaded as an embedding "
                                            "model: it takes `embed`, not `generate`")
            draft = speculative.resolve(self.model, lm, job.params)
        except WorkerError as exc:
            self.end_unstarted(job, exc)
            return
        req = Request(lm, job.params, job.id, self.events(job), job.should_stop, draft=draft,
                      received=job.received, close_cancel=lambda: self.table.close_cancel(job))
        if lm.vision is not None:  # its prompt work may touch MLX: here, bounded in time
            self.scheduler.submit(req)
            return
        if not self.offload.has_generates():  # else behind those: arrival order
            try:
                with prompt_bounds.within(job.should_stop, inline=True):
                    req.prepare_prompt()
            except prompt_bounds.MustOffload:
                pass
            except BaseException as exc:
                self.end_unstarted(job, exc)
                return
            else:
                self.scheduler.submit(req)
                return

        def then(outcome: object) -> None:
            if isinstance(outcome, BaseException):
                self.end_unstarted(job, outcome)
            else:
                self.scheduler.submit(req)

        self.offload.submit(Task(job, req.prepare_prompt, then, gen=req))

    def end_unstarted(self, job: Job, exc: BaseException) -> None:
        """A generate that failed before the scheduler held it: its error,
        or its (empty) cancelled result when a cancel answered true first."""
        if self.table.close_cancel(job):
            queue_ms = generate_result.queue_ms(job.received, job.started)
            self.table.finish(job, generate_result.cancelled(job.params, queue_ms=queue_ms))
        else:
            self.table.finish_with(job, exc)

    def done(self, req: Request, outcome: object) -> None:
        """The scheduler's answer for a request (its stop reason already decided)."""
        job = self.table.running_job(req.request_id)
        if job is not None:  # None: answered at exit meanwhile (answer_leftovers)
            self.table.finish_with(job, outcome)

    def partial_result(self, job: Job) -> Optional[protocol.GenerateResult]:
        """At exit: a running generate's cancelled result from what it streamed (None: not started)."""
        req = self.scheduler.requests.get(job.id)
        return req.cancelled_result() if req is not None else None

    def holds(self, lm) -> bool:
        """A generate uses ``lm`` (as its model or its draft), scheduled or its prompt still prepared."""
        return self.scheduler.holds(lm) or any(
            t.gen is not None and (t.gen.lm is lm or t.gen.draft_lm is lm) for t in self.offload.tasks()
        )

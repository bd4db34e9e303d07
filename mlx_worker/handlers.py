"""Methods that run on the compute thread (everything that touches MLX).

Each method returns its result or raises; the job table (jobs.py) turns
that into the one final response. A generate is handed to the scheduler,
which answers it when it ends. ``unload`` waits (between steps) until no
running generation uses the model.
"""

from __future__ import annotations

import logging
from typing import Any

from . import cache_files, errors, generation, protocol, speculative
from .errors import WorkerError
from .jobs import Job, JobTable
from .loading import LoadCancelled, LoadProgress
from .models import ModelRegistry
from .prompt import check_token_ids, tokenize
from .scheduler import Scheduler, run_alone

log = logging.getLogger("mlx_worker.handlers")


class Handlers:
    def __init__(self, table: JobTable) -> None:
        self.table = table
        self.models = ModelRegistry()
        self.scheduler = Scheduler(self._generation_done, self._all_stores)
        self.deferred: list[Job] = []  # unloads waiting for their model's generations

    # ------------------------------------------------------- compute loop

    def busy(self) -> bool:
        return self.scheduler.busy() or bool(self.deferred)

    def step(self) -> None:
        if self.deferred:
            jobs, self.deferred = self.deferred, []
            for job in jobs:
                self.run(job)
        if self.scheduler.busy():
            try:
                self.scheduler.step()
            except BaseException as exc:  # must not end the compute thread
                log.exception("the scheduler failed; ending the requests it held")
                self.scheduler.fail_all(exc)
        self._drop_failed()

    def _drop_failed(self) -> None:
        """A distributed model whose group failed is unloaded once no request holds it."""
        for model_id in self.models.failed_distributed():
            if not self._in_use(model_id):
                log.warning("unloading %s: its distributed group failed", model_id)
                self.models.unload(model_id)

    def run(self, job: Job) -> None:
        try:
            if job.method == "generate":
                self._generate(job)
                return
            if self.table.stopping:
                raise WorkerError(errors.SHUTTING_DOWN, "the worker is shutting down")
            if job.method == "unload" and self._in_use(job.params.model_id):
                self.deferred.append(job)
                return
            outcome: Any = getattr(self, job.method)(job)
        except BaseException as exc:
            outcome = exc
        self.table.finish_with(job, outcome)
        self._drop_failed()

    def _events(self, job: Job) -> generation.Events:
        """Callbacks that send a request's progress and token notifications."""
        notify = self.table.notify
        return generation.Events(progress=lambda e: notify(job, "progress", e), token=lambda e: notify(job, "token", e))

    def _in_use(self, model_id) -> bool:
        try:
            lm = self.models.get(model_id)
        except WorkerError:
            return False
        return self.scheduler.holds(lm)

    # ------------------------------------------------------------ methods

    def _model(self, model_id) -> Any:
        """A loaded model a new generate may use: not one whose unload is
        deferred (arrival order: the unload came first, so the model is gone
        for every request after it)."""
        lm = self.models.get(model_id)
        for job in self.deferred:
            try:
                going = self.models.get(job.params.model_id)
            except WorkerError:
                continue
            if going is lm:
                raise WorkerError(
                    errors.MODEL_NOT_LOADED,
                    f"model {going.model_id!r} is being unloaded",
                    {"field": "params.model_id", "unloading": going.model_id},
                )
        return lm

    def _generate(self, job: Job) -> None:
        try:
            lm = self._model(job.params.model_id)
        except WorkerError as exc:
            self.table.finish_generate(job, exc)
            return
        gen = generation.Generation(lm, job.params, job.id, self._events(job), job.should_stop)
        gen.job = job
        try:
            gen.draft_lm, gen.num_draft_tokens = speculative.resolve(self._model, lm, job.params)
        except WorkerError as exc:
            self.table.finish_generate(job, exc)
            return
        self.scheduler.submit(gen)

    def _all_stores(self) -> list:
        stores = []
        for lm in self.models.snapshot():
            stores.append(lm.prompt_cache)
            stores.extend(speculative.pair_stores(lm))
        return stores

    def _generation_done(self, gen: generation.Generation, outcome: object) -> None:
        self.table.finish_generate(gen.job, outcome)

    def load(self, job: Job) -> protocol.LoadResult:
        progress = LoadProgress(
            request_id=job.id,
            on_progress=lambda e: self.table.notify(job, "load_progress", e),
            should_stop=job.should_stop,
        )
        try:
            result = self.models.load(job.params, progress)
            # A cancel that answered true after the last group still wins:
            # the model goes again, and the load answers as cancelled.
            if self.table.close_cancel(job):
                if not result.already_loaded:
                    self.models.unload(result.model_id)
                raise LoadCancelled()
        except LoadCancelled:
            if self.table.stopping:
                raise WorkerError(errors.SHUTTING_DOWN, "the worker is shutting down; the load was stopped") from None
            raise
        except Exception:
            # A cancel answered true promised -32012, even if the load then
            # failed for a reason of its own (logged, not sent).
            if self.table.close_cancel(job) and not self.table.stopping:
                log.warning("a cancelled load failed before it could stop", exc_info=True)
                raise LoadCancelled() from None
            raise
        return result

    def unload(self, job: Job) -> protocol.UnloadResult:
        return self.models.unload(job.params.model_id)

    def tokenize(self, job: Job) -> protocol.TokenizeResult:
        return tokenize(self.models.get(job.params.model_id), job.params)

    def detokenize(self, job: Job) -> protocol.DetokenizeResult:
        lm = self.models.get(job.params.model_id)
        check_token_ids(lm, job.params.tokens, "params.tokens")
        return protocol.DetokenizeResult(text=lm.decode(job.params.tokens))

    def close(self) -> None:
        """The worker stops: every prompt-cache entry goes to its disk tier."""
        from .cache_disk import spill_all

        for lm in self.models.snapshot():
            written = spill_all(lm, [lm.prompt_cache, *speculative.pair_stores(lm)])
            if written:
                log.info("prompt cache: %d entries of %s written to disk", written, lm.model_id)

    def set_limits(self, job: Job) -> protocol.SetLimitsResult:
        from . import memory

        return memory.set_limits(job.params, self.models.snapshot())

    def cache_save(self, job: Job) -> protocol.CacheSaveResult:
        lm = self.models.get(job.params.model_id)
        _no_cache_files(lm)

        def prefill(params):  # progress events while the uncached part is prefilled
            gen = generation.Generation(lm, params, job.id, self._events(job), job.should_stop)
            outcome = run_alone(gen, beside=self.scheduler)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome, gen.stored

        return cache_files.save(lm, job.params, prefill)

    def cache_load(self, job: Job) -> protocol.CacheLoadResult:
        lm = self.models.get(job.params.model_id)
        _no_cache_files(lm)
        return cache_files.load(lm, job.params)


def _no_cache_files(lm) -> None:
    if "parallel" in lm.extra:
        raise errors.invalid_params("params.model_id", "prompt cache files are not supported for distributed models")

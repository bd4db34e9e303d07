"""Methods that run on the compute thread (everything that touches MLX)."""

from __future__ import annotations

from typing import Any

from . import errors, generation, protocol
from .errors import WorkerError
from .loading import LoadCancelled, LoadProgress
from .models import ModelRegistry
from .prompt import check_token_ids, tokenize


class Handlers:
    def __init__(self, worker) -> None:
        self.worker = worker
        self.models = ModelRegistry()

    def dispatch(self, job) -> Any:
        return getattr(self, job.method)(job)

    def _events(self, job) -> generation.Events:
        """Callbacks that send a request's progress and token notifications
        (the job remembers what its token events carried)."""
        notify = self.worker.job_notify
        return generation.Events(progress=lambda e: notify(job, "progress", e), token=lambda e: notify(job, "token", e))

    def load(self, job) -> protocol.LoadResult:
        progress = LoadProgress(
            request_id=job.id,
            on_progress=lambda e: self.worker.job_notify(job, "load_progress", e),
            should_stop=job.cancel.is_set,
        )
        try:
            result = self.models.load(job.params, progress)
            # A cancel that answered true after the last group still wins:
            # the model goes again, and the load answers as cancelled.
            with job.lock:
                job.finished = True
                if job.cancel.is_set() and not result.already_loaded:
                    self.models.unload(result.model_id)
                if job.cancel.is_set():
                    raise LoadCancelled()
        except LoadCancelled:
            if self.worker.stopping.is_set():
                raise WorkerError(errors.SHUTTING_DOWN, "the worker is shutting down; the load was stopped") from None
            raise
        return result

    def unload(self, job) -> protocol.UnloadResult:
        return self.models.unload(job.params.model_id)

    def tokenize(self, job) -> protocol.TokenizeResult:
        return tokenize(self.models.get(job.params.model_id), job.params)

    def detokenize(self, job) -> protocol.DetokenizeResult:
        lm = self.models.get(job.params.model_id)
        check_token_ids(lm, job.params.tokens, "params.tokens")
        return protocol.DetokenizeResult(text=lm.decode(job.params.tokens))

    def cache_save(self, job) -> protocol.CacheSaveResult:
        from . import cache_files

        events = self._events(job)  # progress while the uncached part is prefilled
        lm = self.models.get(job.params.model_id)
        return cache_files.save(lm, job.params, job.id, events, job.cancel.is_set)

    def cache_load(self, job) -> protocol.CacheLoadResult:
        from . import cache_files

        return cache_files.load(self.models.get(job.params.model_id), job.params)

    def generate(self, job) -> protocol.GenerateResult:
        events = self._events(job)
        try:
            lm = self.models.get(job.params.model_id)
            result = generation.run(lm, job.params, job.id, events, job.cancel.is_set)
        except Exception:
            # Once `cancel` answered {cancelled: true}, the final response
            # must be a result saying "cancelled", even if the work failed;
            # it carries what the token events already delivered.
            with job.lock:
                job.finished = True
                if not job.cancel.is_set():
                    raise
            result = job.cancelled_result()
        with job.lock:
            job.finished = True
            if job.cancel.is_set():
                result.stop_reason = "cancelled"
        result.timings.queue_ms = round((job.started - job.received) * 1000, 3)
        return result

"""Methods that run on the compute thread (everything that touches MLX).

Each method returns its result or raises; the job table (jobs.py) turns
that into the one final response. A generate is handed to the scheduler,
which answers it when it ends (generates.py). ``unload`` waits (between steps) until no
running generation uses the model.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from .cache import files as cache_files
from . import embeddings, errors, prompt_bounds, protocol
from .distributed import loader as distributed_loader
from .engine import draft_pairs, layouts
from .engine.request import Cancelled, Request
from .errors import WorkerError
from .generates import Generates
from .jobs import Job, JobTable
from .models.loading import LoadCancelled, LoadProgress
from .models import text as text_loader
from .models.registry import ModelRegistry
from .offload import Offload, Task
from .prompt import check_token_ids, tokenize
from .engine.scheduler import run_alone
from .tools.formats import load_fields
from . import vision

# Loaders by precedence: the first that claims a folder loads it (models/loader.py).
LOADERS = {"embedding": embeddings.LOADER, "parallel": distributed_loader.LOADER,
           "vision": vision.LOADER, "text": text_loader.LOADER}

log = logging.getLogger("mlx_worker.methods")


class Methods:
    def __init__(self, table: JobTable) -> None:
        self.table = table
        self.models = ModelRegistry(LOADERS, hooks=[draft_pairs.LoadPairing()])
        self.deferred: list[Job] = []  # unloads waiting for their model's generations
        self.offload = Offload(wake=table.poke)  # prompts too long to prepare on this thread
        self.generates = Generates(table, self._model, self.offload)
        self.scheduler = self.generates.scheduler

    # ------------------------------------------------------- compute loop

    def busy(self) -> bool:
        return self.scheduler.busy() or bool(self.deferred) or self.offload.busy()

    def step(self) -> None:
        self._hand_on_offloaded()
        if self.deferred:
            jobs, self.deferred = self.deferred, []
            for job in jobs:
                self.run(job)
        if self.scheduler.busy():
            self._decode_step()
        elif self.offload.busy():
            # Nothing to step: wait for the prompt thread, a new job, or (polled) a cancel.
            self.table.wait_for_work(0.02, self.offload.has_done)
        self._drop_failed()

    def _hand_on_offloaded(self) -> None:
        for task in self.offload.tasks():
            if task.gen is not None and not task.answered and task.job.should_stop():
                # Cancelled while its prompt is prepared: answered now, whatever
                # the prompt thread is still doing with it.
                task.answered = True
                self.generates.end_unstarted(task.job, Cancelled())
        for task in self.offload.take_done():
            if not task.answered:
                task.then(task.outcome)

    def _drop_failed(self) -> None:
        """A distributed model whose group failed is unloaded once no request holds it."""
        for model_id in self.models.failed():
            if not self._in_use(model_id):
                log.warning("unloading %s: its distributed group failed", model_id)
                self.models.unload(model_id)

    def run(self, job: Job) -> None:
        try:
            if job.method == "generate":
                self.generates.start(job)
                return
            if self.table.stopping:
                raise WorkerError(errors.SHUTTING_DOWN, "the worker is shutting down")
            if job.method == "tokenize":
                self._tokenize(job)
                return
            if job.method == "unload" and self._in_use(job.params.model_id):
                self.deferred.append(job)
                return
            outcome: Any = getattr(self, job.method)(job)
        except BaseException as exc:
            outcome = exc
        self.table.finish_with(job, outcome)
        # An error's traceback holds this frame, and this frame the error: a
        # cycle that would keep whatever the failed work held (arrays read)
        # until a cyclic GC.
        outcome = None
        self._drop_failed()

    def _in_use(self, model_id) -> bool:
        try:
            lm = self.models.get(model_id)
        except WorkerError:
            return False
        return self.generates.holds(lm)

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
        lm = self.models.get(result.model_id)
        if lm.kind == "text" and lm.parallel is None:
            # Whether its batches pack (engine/packed.py's one-time check: a few
            # tiny passes), decided now so that no request's peak memory counts it.
            layouts.ragged(lm.model)
        return result if lm.kind == "embedding" else msgspec.structs.replace(result, **load_fields(lm.tokenizer))

    def embed(self, job: Job) -> protocol.EmbedResult:
        lm = self._model(job.params.model_id)
        if lm.kind != "embedding":
            raise errors.invalid_params("params.model_id", f"model {lm.model_id!r} is loaded for generation, not "
                                        "embeddings (load an embedding model, or this folder with embedding: true)")
        outstanding = sum(g.need for g in self.scheduler.running())
        result = embeddings.embed(lm, job.params, job.should_stop, between=self._decode_step, outstanding=outstanding)
        if self.table.close_cancel(job):  # a cancel answered true after the last batch still wins
            raise WorkerError(errors.CANCELLED, "the embed was cancelled")
        return result

    def _decode_step(self) -> None:
        """One scheduler step (also between an embed's batches: the running
        generations go on); a failure in it must not end the compute thread."""
        if self.scheduler.busy():
            try:
                self.scheduler.step()
            except BaseException as exc:
                log.exception("the scheduler failed; ending the requests it held")
                self.scheduler.fail_all(exc)

    def unload(self, job: Job) -> protocol.UnloadResult:
        return self.models.unload(job.params.model_id)

    def _tokenize(self, job: Job) -> None:
        lm = self.models.get(job.params.model_id)

        def work() -> protocol.TokenizeResult:
            try:
                return tokenize(lm, job.params)
            except prompt_bounds.RenderStopped:  # a tokenize is stopped only by shutdown
                raise WorkerError(errors.SHUTTING_DOWN, "the worker is shutting down") from None

        try:
            with prompt_bounds.within(job.should_stop, inline=lm.vision is None):
                outcome: object = work()
        except prompt_bounds.MustOffload:
            self.offload.submit(Task(job, work, lambda o: self.table.finish_with(job, o)))
            return
        except BaseException as exc:
            outcome = exc
        self.table.finish_with(job, outcome)

    def detokenize(self, job: Job) -> protocol.DetokenizeResult:
        lm = self.models.get(job.params.model_id)
        check_token_ids(lm, job.params.tokens, "params.tokens")
        return protocol.DetokenizeResult(text=lm.decode(job.params.tokens))

    def close(self) -> None:
        """The worker stops: every prompt-cache entry goes to its disk tier."""
        from .cache.disk import spill_all

        for lm in self.models.snapshot():
            written = spill_all(lm, [lm.prompt_cache, *draft_pairs.pair_stores(lm)])
            if written:
                log.info("prompt cache: %d entries of %s written to disk", written, lm.model_id)

    def set_limits(self, job: Job) -> protocol.SetLimitsResult:
        from . import memory

        return memory.set_limits(job.params, self.models.snapshot())

    def cache_save(self, job: Job) -> protocol.CacheSaveResult:
        lm = self.models.get(job.params.model_id)
        _no_cache_files(lm)

        def prefill(params):  # progress events while the uncached part is prefilled
            gen = Request(lm, params, job.id, self.generates.events(job), job.should_stop)
            outcome = run_alone(gen, beside=self.scheduler)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome, gen.stored

        return cache_files.save(lm, job.params, prefill)

    def distributed_capabilities(self) -> protocol.DistributedCapabilities:
        """For ``status`` (any thread): what ``load {parallel}`` can start, and this worker's group."""
        from .distributed import ring

        return ring.capabilities()

    def cache_load(self, job: Job) -> protocol.CacheLoadResult:
        lm = self.models.get(job.params.model_id)
        _no_cache_files(lm)
        return cache_files.load(lm, job.params)


def _no_cache_files(lm) -> None:
    if lm.kind == "embedding":
        raise errors.invalid_params("params.model_id", f"model {lm.model_id!r} is an embedding model: it has no KV cache")
    if lm.parallel is not None:
        raise errors.invalid_params("params.model_id", "prompt cache files are not supported for distributed models")

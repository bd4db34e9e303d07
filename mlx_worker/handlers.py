"""Methods that run on the compute thread (everything that touches MLX)."""

from __future__ import annotations

from typing import Any

from . import generation, protocol
from .models import ModelRegistry
from .prompt import check_token_ids, tokenize


class Handlers:
    def __init__(self, worker) -> None:
        self.worker = worker
        self.models = ModelRegistry()

    def dispatch(self, job) -> Any:
        return getattr(self, job.method)(job)

    def _events(self, on_token=None) -> generation.Events:
        """Callbacks that send a request's progress and token notifications."""
        notify = self.worker.notify

        def token(event: protocol.TokenEvent) -> None:
            if on_token is not None:
                on_token(event)
            notify("token", event)

        return generation.Events(progress=lambda e: notify("progress", e), token=token)

    def load(self, job) -> protocol.LoadResult:
        return self.models.load(job.params)

    def unload(self, job) -> protocol.UnloadResult:
        return self.models.unload(job.params.model_id)

    def tokenize(self, job) -> protocol.TokenizeResult:
        return tokenize(self.models.get(job.params.model_id), job.params)

    def detokenize(self, job) -> protocol.DetokenizeResult:
        lm = self.models.get(job.params.model_id)
        check_token_ids(lm, job.params.tokens, "params.tokens")
        return protocol.DetokenizeResult(text=lm.tokenizer.decode(job.params.tokens, skip_special_tokens=False))

    def cache_save(self, job) -> protocol.CacheSaveResult:
        from . import cache_files

        events = self._events()  # progress while the uncached part is prefilled
        lm = self.models.get(job.params.model_id)
        return cache_files.save(lm, job.params, job.id, events, job.cancel.is_set)

    def cache_load(self, job) -> protocol.CacheLoadResult:
        from . import cache_files

        return cache_files.load(self.models.get(job.params.model_id), job.params)

    def generate(self, job) -> protocol.GenerateResult:
        streamed_text: list[str] = []
        streamed_tokens: list[int] = []
        by_channel: dict[str, list[str]] = {"content": [], "reasoning": []}

        def remember(event: protocol.TokenEvent) -> None:
            streamed_text.append(event.text)
            streamed_tokens.extend(event.tokens)
            by_channel.get(event.channel, []).append(event.text)

        events = self._events(remember)
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
            result = protocol.cancelled_result(
                job.params, "".join(streamed_text), streamed_tokens,
                content="".join(by_channel["content"]), reasoning="".join(by_channel["reasoning"]),
            )
        with job.lock:
            job.finished = True
            if job.cancel.is_set():
                result.stop_reason = "cancelled"
        result.timings.queue_ms = round((job.started - job.received) * 1000, 3)
        return result

"""Prefill chunk sizes while streams decode: a measured controller.

While streams are decoding, chunks are sized (from measured times) to take
about CHUNK_TIME_IN_STEPS decode steps, to keep a stream's gap between tokens
near three idle gaps; alone, a prompt is processed in its own
``prefill_step_size`` chunks, exactly as mlx-lm would. Spec: "Batching".
"""

from __future__ import annotations

MIN_CHUNK = 16
CHUNK_TIME_IN_STEPS = 2.0  # a chunk during decoding takes about this many decode steps
# A mixed pass (a chunk riding along in the decode step) takes about this
# many plain decode steps: the streams' gap while a prompt is processed.
MIXED_TIME_IN_STEPS = 2.5


class ChunkSize:
    def __init__(self, steps: float = CHUNK_TIME_IN_STEPS, chunk: int = 64) -> None:
        self.steps = steps
        self.step_s = 0.0  # decode step time (moving average)
        self.size = float(chunk)  # unrounded: small corrections add up

    @property
    def chunk(self) -> int:
        return int(self.size)

    def stepped(self, dt: float) -> None:
        """A decode step (of every group) took ``dt`` seconds."""
        self.step_s = dt if not self.step_s else 0.8 * self.step_s + 0.2 * dt

    def tune(self, n: int, dt: float, limit: int) -> None:
        """Size the next chunk so that it takes about ``steps`` decode
        steps: ``n`` tokens took ``dt``, so scale by target / dt. A pass
        also has costs that don't grow with its tokens (a mixed pass: the
        rows'), so this approaches the target from one side without
        overshooting, instead of swinging around it (a fixed +25 % / -20 %
        step made every other pass ~25 % too long)."""
        if dt <= 0 or n <= 0 or not self.step_s:
            return
        target = self.step_s * self.steps
        if n < self.chunk and dt < target:
            return  # a prompt's last, short chunk: says nothing of a full one
        scale = min(2.0, max(0.5, target / dt))
        self.size = max(MIN_CHUNK, min(limit, n * scale))


def chunking_free(req) -> bool:
    """A request outside the batch whose output doesn't depend on how its
    prompt is chunked (plain or quantized KV on a text model, a draft pair
    included), so its chunks can be sized for the running streams too.
    Windows and recurrent state keep their own ``prefill_step_size``: there
    the chunking is part of the result (see the spec's Rotating caches)."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    return req.lm.vision is None and all(type(c) in (KVCache, QuantizedKVCache) for c in req.cache)

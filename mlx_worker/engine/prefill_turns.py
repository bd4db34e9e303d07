"""Prefill turns: which prompt chunk runs next, and with which others.

Prompts take turns chunk by chunk (a short request behind a long prompt
starts after a chunk or two); prompts of one model waiting together advance
together in one pass; interactive prompts first, a background one in short
chunks (priority.py). Where the model's decode batch packs, a chunk rides
along in its step (``ride``: one mixed pass). Sizes: chunking.py.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

from .. import faults, memory_model
from . import priority, runner
from .chunking import CHUNK_TIME_IN_STEPS, MIXED_TIME_IN_STEPS, ChunkSize, chunking_free
from .request import Request

log = logging.getLogger("mlx_worker.engine.prefill_turns")

MAX_PREFILL_ROWS = 16  # prompts prefilled together in one forward pass
# A background prompt's chunk takes about this long, decoding or not: an
# interactive request arriving meanwhile waits at most about one of them.
BACKGROUND_CHUNK_S = 0.05


def tower(req: Request):
    """Its image tower's pieces still to compute before its prompt's chunks
    (vision/tower_pieces.py, recorded in its prompt plan), or None."""
    pieces = getattr(req.positions, "tower", None)
    return pieces if pieces else None


def prefills(req: Request) -> bool:
    """Whether it has prefill turns to take: tower pieces, prompt chunks."""
    return req.to_prefill > 0 or tower(req) is not None


@dataclass
class Ride:
    """Prompt chunks riding along in one decode group's step (a mixed pass)."""

    group: object
    chunks: list  # (request, tokens to process)

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)


class PrefillTurns:
    def __init__(self) -> None:
        self.queue: collections.deque[Request] = collections.deque()
        self.chunks = ChunkSize()
        self.background = ChunkSize()  # sized for BACKGROUND_CHUNK_S, not for decode steps
        self.background.step_s = BACKGROUND_CHUNK_S / CHUNK_TIME_IN_STEPS
        self.mixed = ChunkSize(MIXED_TIME_IN_STEPS, chunk=32)  # chunks riding along in a decode step

    def stepped(self, dt: float, ride: "Ride | None") -> None:
        """The decode groups' step took ``dt``; ``ride``: the prompt chunks
        that rode along in it (None: a plain decode step)."""
        if ride is not None:
            log.debug("mixed pass: %d prompt tokens (%d prompts) with the decode rows in %.1f ms (step %.1f ms)",
                      ride.tokens, len(ride.chunks), dt * 1000, self.chunks.step_s * 1000)
            if len(ride.chunks) == 1:
                self.mixed.tune(ride.tokens, dt, 1 << 30)
        else:
            self.chunks.stepped(dt)
            self.mixed.step_s = self.chunks.step_s

    def ride(self, batches: dict) -> tuple:
        """The next turn's prompt chunk, when it can ride along in its model's
        decode step (a group that packs: layouts.py), with the chunks of the
        other shallow prompts of that model waiting beside it: (Ride, None),
        taken off the queue; or (Ride, the exception the turn's fault point
        raised: faults.py); else (None, None): a turn of its own."""
        req = priority.peek(self.queue)
        group = batches.get(id(req.lm.model))
        if group is None or not group.packs or not req.text_batchable or req.should_stop():
            return None, None
        n = min(req.plan.step_size, self.mixed.chunk)
        first = req.next_chunk(n)
        if first <= 0:
            return None, None
        self.queue.remove(req)
        try:
            faults.hit("prefill")
        except BaseException as exc:
            return Ride(group, [(req, first)]), exc
        chunks = [(r, r.next_chunk(n)) for r in self._together(req, n, packed=True)]
        self.queue.extend(r for r, k in chunks if k <= 0)  # at a checkpoint the lease wants: next turn
        return Ride(group, [(r, k) for r, k in chunks if k > 0]), None

    def run_one(self, decoding: int) -> tuple[list[Request], BaseException | None]:
        """The next turn's chunk (``decoding``: streams decoding meanwhile).
        Returns the requests it ran, and the exception the pass failed with."""
        req = priority.next_turn(self.queue)  # interactive prompts first
        pieces = tower(req)
        if pieces is not None:
            return [req], self._tower(req, pieces, decoding)
        n = req.plan.step_size
        # sized for the decoding streams, or (a background prompt) short
        sized = (decoding > 0 or not priority.interactive(req)) and (req.text_batchable or chunking_free(req))
        chunks = self.chunks if decoding > 0 else self.background
        if sized:
            n = min(n, chunks.chunk)
        together = self._together(req, n)
        before = [r.processed for r in together]
        t0 = time.perf_counter()
        try:
            if len(together) > 1:
                runner.prefill_together(req.lm.model, together, n)
            else:
                runner.prefill(req, n, clear_cache=decoding == 0)
        except BaseException as exc:
            return together, exc
        dt = time.perf_counter() - t0
        done = [r.processed - b for r, b in zip(together, before)]
        log.debug("prefill of %d tokens (%d prompts) in %.1f ms (decoding: %d, step %.1f ms)",
                  sum(done), len(together), dt * 1000, decoding, self.chunks.step_s * 1000)
        if sized:  # the size is per prompt: a pass of k prompts ran k chunks
            chunks.tune(max(done), dt, req.plan.step_size)
        return together, None

    def _tower(self, req: Request, pieces, decoding: int) -> BaseException | None:
        """A turn of its image tower's pieces: about a prompt chunk's time
        while streams decode (a background chunk's for a background
        request), else all of them."""
        budget = CHUNK_TIME_IN_STEPS * self.chunks.step_s if decoding > 0 else float("inf")
        if not priority.interactive(req):
            budget = min(budget, BACKGROUND_CHUNK_S)
        t0 = time.perf_counter()
        try:
            faults.hit("prefill")
            ran = pieces.run(budget)
        except BaseException as exc:
            return exc
        log.debug("image tower: %d pieces in %.1f ms (%d left, decoding: %d)", ran,
                  (time.perf_counter() - t0) * 1000, len(pieces.arrays), decoding)
        return None

    def _together(self, req: Request, n: int, packed: bool = False) -> list[Request]:
        """Prompts of the same model waiting together advance together: one
        forward pass for a chunk of each (a pass costs far less than one per
        prompt), as long as the KV merged for it stays small (a prompt
        already deep in its cache goes on alone: merging would copy all of
        it every chunk). ``packed``: a mixed pass, which merges nothing."""
        together = [req]
        shallow = lambda r: packed or r.processed <= memory_model.shallow_limit(n)  # noqa: E731
        if req.text_batchable and shallow(req):
            for other in list(self.queue):
                if len(together) >= MAX_PREFILL_ROWS:
                    break
                if (other.lm is req.lm and other.text_batchable and shallow(other)
                        and priority.of(other) == priority.of(req)
                        and other.plan.step_size == req.plan.step_size and not other.should_stop()):
                    self.queue.remove(other)
                    together.append(other)
        return together

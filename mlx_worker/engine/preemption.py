"""Preemption: pause the youngest decoding request (a background one first)
when the running requests' KV outgrew the memory limit, resume it once it fits.

The paused request's KV goes to the disk tier's folder (paused.py), so it
continues exactly where it stopped. Only with a disk tier: a pause that kept
the KV in memory would free nothing. Spec: "Memory limits" (preemption).
"""

from __future__ import annotations

import logging
import mlx.core as mx

from .. import memory
from . import paused as paused_kv, priority
from .batch import DecodeGroup

log = logging.getLogger("mlx_worker.engine.preemption")


class Preemption:
    def __init__(self, scheduler):
        self.scheduler = scheduler
        # (request, its KV on disk, batchable), oldest first.
        self.paused: list[tuple] = []

    def preempt(self) -> None:
        """Pause the youngest decoding rows, background ones first, until the rest fit the limit."""
        s = self.scheduler
        limit = memory.worker_limit()
        while s.decoding() > 1 and s.admission.kv_estimate() > limit:
            rows = [(g, group) for group in s.decode.all()
                    if isinstance(group, DecodeGroup) for g in group.rows]  # not a speculative group
            if not rows:
                return
            # background before interactive, then the youngest
            gen, group = max(rows, key=lambda r: (not priority.interactive(r[0]), r[0].admitted))
            folder = _pause_folder(gen)
            if folder is None:
                return
            batchable = group.batchable
            cache, y, lp = group.pause(gen)
            try:
                saved = paused_kv.stash(folder, cache, y, lp)
            except OSError:
                log.warning("could not pause a request (its KV could not be written); it goes on")
                group.resume(gen, cache, y, lp)
                return
            del cache
            if not group.rows:
                s.decode.drop(group)
            mx.clear_cache()
            self.paused.append((gen, saved, batchable))
            log.info("paused request %r: %d bytes of KV written out", gen.request_id, saved.nbytes)

    def resume(self) -> None:
        """Resume the paused requests, oldest first, as soon as each fits
        (or nothing else runs); a cancelled one ends with its output so far."""
        s = self.scheduler
        limit = memory.worker_limit()
        while self.paused:
            gen, saved, batchable = self.paused[0]
            if not (gen.should_stop() or not s.running() or s.admission.kv_estimate(gen) <= limit):
                return
            if not (gen.should_stop() or priority.interactive(gen)) and priority.waiting_interactive(s.waiting):
                return  # an interactive request waiting for memory goes first
            self.paused.pop(0)
            try:
                cache, y, lp = saved.restore()
            except BaseException as exc:
                saved.drop()
                s.fail(gen, exc)
                continue
            if gen.should_stop():
                s.finish(gen, "cancelled", cache)
                continue
            s.decode.group_for(gen.lm.model, batchable).resume(gen, cache, y, lp)
            log.info("resumed request %r", gen.request_id)

    def requests(self) -> list:
        return [p[0] for p in self.paused]

    def drop_all(self) -> None:
        for _, saved, _ in self.paused:
            saved.drop()
        self.paused.clear()


def _pause_folder(gen):
    """Where a paused request's KV goes: its model's disk tier, else the worker's."""
    from ..cache.disk import tier_for

    tier = getattr(gen.lm.prompt_cache, "disk", None) or tier_for(None, None)
    return tier.folder.path if tier is not None else None

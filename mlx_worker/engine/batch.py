"""A decode batch: the requests of one model that step together.

One forward pass per step for every row (runner.py), then each row's own
sampler (sampler.py: processors, constraint mask, its own PRNG key) on its row
of logits. Rows join and leave between steps without disturbing the others;
steps are pipelined as in mlx-lm's ``generate_step`` (see ``DecodeGroup``).
Spec: "Batching".
"""

from __future__ import annotations

import logging
from typing import Optional

import mlx.core as mx
from mlx_lm.generate import generation_stream

from .. import faults
from ..constraints import batch_masks
from . import layouts, runner
from .request import Request

log = logging.getLogger("mlx_worker.engine.batch")


class DecodeGroup:
    """The rows of one model that decode together.

    KV layout (layouts.py): ``Ragged`` where the model packs (each row its own
    cache, one packed pass per step, a prompt chunk may ride along), else
    ``Merged`` (mlx-lm's ``BatchKVCache`` from the second row on). A single
    row decodes in its own plain cache either way, exactly the computation
    mlx-lm's ``generate_step`` does. A row that can't be batched (rotating
    window, recurrent state, quantized KV, a vision family not in
    vision/lm.py's BATCH_FAMILIES) is a group of its own; a vision row's first
    step runs alone as it joins (``_join_primed``), then it steps at its own
    positions.

    Steps are pipelined as in ``generate_step``: step k+1 is queued (async)
    before the tokens of step k are read, so the host-side work (text, events,
    constraint masks) overlaps the forward pass. A row that stops has had one
    more token fed than it returns, which is what the prompt cache expects.
    """

    def __init__(self, model, batchable: bool):
        self.model = model
        self.batchable = batchable
        self.kv = layouts.for_model(model, batchable)
        self.rows: list[Request] = []
        self.y: Optional[mx.array] = None  # (B,) tokens the next step feeds, maybe lazy
        self.logprobs: list[Optional[mx.array]] = []  # per row: the logprobs behind y
        self.embedding: Optional[mx.array] = None  # a lone vision row's first input embedding

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def packs(self) -> bool:
        """Whether a prompt chunk can ride along in this group's step."""
        return self.kv.packs and bool(self.rows)

    @property
    def cache(self) -> list:
        """Every cache layer the group holds (admission counts their bytes)."""
        return self.kv.layers()

    # -------------------------------------------------------- join, leave

    def join(self, gen: Request) -> None:
        gen.computed = True
        if self.batchable and gen.lm.vision is not None:
            return self._join_primed(gen)
        last, emb = gen.last_input()
        self._add(gen, gen.cache, last, None)
        if len(self.rows) == 1:
            self.embedding = emb
        gen.cache = None  # the group owns its KV now

    def _join_primed(self, gen: Request) -> None:
        """A vision row: its first step (the prompt's last token: its own
        positions, image embedding, whole-prompt inputs) runs alone, exactly
        as solo; past its prompt it is a plain row whose position is its
        offset + its rope delta (runner.set_row_positions)."""
        last, _ = gen.last_input()
        faults.hit("join")
        with mx.stream(generation_stream):
            logits = runner.first_step(gen)
            token, lp = gen.sampler.row(logits, last)
            token = token.astype(mx.uint32)
            # Waited for (not queued): an allocation failure in this step
            # then ends this request only (scheduler._join), not the batch.
            mx.eval(token, lp)
        gen.accept(gen.prompt.tokens[-1], None)  # primed (a cancel shows at its next token)
        cache, gen.cache = gen.cache, None
        self.resume(gen, cache, token, lp)

    def _add(self, gen: Request, cache: list, y: mx.array, lp: Optional[mx.array]) -> None:
        self.kv.add(cache, len(self.rows))
        self.y = y if not self.rows else mx.concatenate([self.y, y.astype(self.y.dtype)])
        self.rows.append(gen)
        self.logprobs.append(lp)
        if len(self.rows) > 1:
            log.debug("request %r joins a decode batch of %d rows: %r", gen.request_id, len(self.rows),
                      [r.request_id for r in self.rows])

    def own_cache(self, i: int) -> list:
        """Row i's KV as plain per-request caches (for the prompt cache).
        A row cut out of a shared buffer is a lazy copy, which until
        evaluated holds the whole buffer (every row's KV, at that step)
        where the prompt cache counts only the row's bytes: its copy is
        queued now (not waited for: the next step is in flight)."""
        cache = self.kv.own(i, len(self.rows))
        mx.async_eval([c.state for c in cache])
        return cache

    def leave(self, gone: list[int]) -> None:
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.rows = [self.rows[i] for i in keep]
        self.logprobs = [self.logprobs[i] for i in keep]
        self.kv.keep(keep)
        if not keep:
            self.y = self.embedding = None
            return
        self.y = self.y[mx.array(keep)] if len(keep) != self.y.shape[0] else self.y

    # ------------------------------------------------------ pause, resume

    def pause(self, gen: Request) -> tuple[list, mx.array, Optional[mx.array]]:
        """Take a row out between steps (preemption): its own cache, the
        token the next step would feed it (sampled, not yet read) and that
        token's logprobs, all evaluated."""
        i = self.rows.index(gen)
        cache = self.own_cache(i)
        y, lp = self.y[i : i + 1], self.logprobs[i]
        mx.eval([c.state for c in cache], y, *([lp] if lp is not None else []))
        self.leave([i])
        return cache, y, lp

    def resume(self, gen: Request, cache: list, y: mx.array, lp: Optional[mx.array]) -> None:
        """A paused row comes back: as ``join``, with its pending token."""
        self._add(gen, cache, y, lp)

    # ---------------------------------------------------------------- step

    def step(self, chunks: Optional[list[tuple[Request, int]]] = None) -> list[tuple[Request, object, Optional[list]]]:
        """Queue the next step, then read this one's tokens. Returns the rows
        that ended: (generation, stop reason or the exception it failed with,
        its own cache). ``chunks``: prompts' next tokens (request, n) to
        process in the same pass (``packs``); if the pass fails, they are
        returned with the exception too."""
        rows = self.rows
        failures: dict[int, BaseException] = {}
        with mx.stream(generation_stream):
            embedding, self.embedding = self.embedding, None
            try:
                lone = rows[0] if len(rows) == 1 else None
                if lone is None:
                    runner.set_row_positions(rows)  # vision rows: each at its own
                logits = self.kv.forward(self.model, self.y, lone, embedding, chunks)
            except BaseException as exc:  # the whole batch fails: every row gets it
                self.leave(list(range(len(rows))))
                return [(gen, exc, None) for gen in rows + [r for r, _ in chunks or []]]
            logits = batch_masks.prepare(rows, logits, self.y)  # constrained rows' masks in one call
            tokens, logprobs = [], []
            for i, gen in enumerate(rows):
                try:
                    token, lp = gen.sampler.row(logits[i : i + 1], self.y[i : i + 1])
                except BaseException as exc:  # e.g. a constraint that fails: this row only
                    failures[i] = exc
                    token, lp = mx.zeros((1,), dtype=mx.uint32), None
                tokens.append(token.astype(mx.uint32))
                logprobs.append(lp)
            next_y = tokens[0] if len(tokens) == 1 else mx.concatenate(tokens)
            mx.async_eval(next_y, *[lp for lp in logprobs if lp is not None])
        return self._read(rows, failures, next_y, logprobs)

    def _read(self, rows: list[Request], failures: dict, next_y: mx.array, logprobs: list) -> list:
        """Read this step's tokens (while the next step runs) and hand them to the rows."""
        ended: list = []
        read = self.y.tolist()
        for i, gen in enumerate(rows):
            if i in failures:
                ended.append((i, failures[i]))
                continue
            try:
                reason = gen.accept(read[i], self.logprobs[i])
            except BaseException as exc:
                ended.append((i, exc))
                continue
            if reason is not None:
                ended.append((i, reason))
        self.y, self.logprobs = next_y, logprobs
        out = []
        if ended:
            for i, outcome in ended:
                cache = self.own_cache(i) if isinstance(outcome, str) else None
                out.append((rows[i], outcome, cache))
            self.leave([i for i, _ in ended])
        return out


class DecodeGroups:
    """Every decode group of a scheduler: one batch per model, plus groups
    of one request (KV that can't be merged, speculative decoding)."""

    def __init__(self) -> None:
        self.batches: dict[int, DecodeGroup] = {}  # id(model) -> its batch
        self.alone: list = []

    def __len__(self) -> int:
        """Requests decoding."""
        return sum(len(g) for g in self.batches.values()) + sum(len(g) for g in self.alone)

    def all(self) -> list:
        return list(self.batches.values()) + self.alone

    def group_for(self, model, batchable: bool) -> DecodeGroup:
        if batchable:
            return self.batches.setdefault(id(model), DecodeGroup(model, True))
        group = DecodeGroup(model, False)
        self.alone.append(group)
        return group

    def step(self, ride) -> tuple[list, bool]:
        """One step of every group. ``ride``: prompt chunks riding along in
        one group's pass (prefill_turns.Ride). Returns the requests that
        ended (request, outcome, cache), and whether any group stepped."""
        ended, stepped = [], False
        for group in self.all():
            if group.rows:
                ridden = ride is not None and ride.group is group
                ended += group.step(ride.chunks) if ridden else group.step()
                stepped = True
            if not group.rows:
                self.drop(group)
        return ended, stepped

    def add_alone(self, group) -> None:
        self.alone.append(group)

    def drop(self, group) -> None:
        if group in self.alone:
            self.alone.remove(group)
        for key, g in list(self.batches.items()):
            if g is group:
                del self.batches[key]

    def in_batch(self, req: Request) -> bool:
        return any(req in group.rows for group in self.batches.values())

    def clear(self) -> None:
        self.batches.clear()
        self.alone.clear()

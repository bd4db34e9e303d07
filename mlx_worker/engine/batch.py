"""A decode batch: the requests of one model that step together.

One forward pass per step for every row (runner.decode), then each row's own
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
from mlx_lm.models.cache import BatchKVCache

from . import runner
from .request import Request

log = logging.getLogger("mlx_worker.engine.batch")


class DecodeGroup:
    """The rows of one model that decode together.

    KV layout: a single row decodes in its own plain cache, exactly the
    computation mlx-lm's ``generate_step`` does (the batch path costs a lone
    stream nothing). From the second row on, the rows' caches are merged into
    mlx-lm's ``BatchKVCache`` (left-padded); when one row is left it is
    extracted back. A row that can't be merged (rotating window, recurrent
    state, quantized KV, a vision model's positions) is a group of its own.

    Steps are pipelined as in ``generate_step``: step k+1 is queued (async)
    before the tokens of step k are read, so the host-side work (text, events,
    constraint masks) overlaps the forward pass. A row that stops has had one
    more token fed than it returns, which is what the prompt cache expects.
    """

    def __init__(self, model, batchable: bool):
        self.model = model
        self.batchable = batchable
        self.rows: list[Request] = []
        self.cache: Optional[list] = None  # plain (one row) or BatchKVCache layers
        self.y: Optional[mx.array] = None  # (B,) tokens the next step feeds, maybe lazy
        self.logprobs: list[Optional[mx.array]] = []  # per row: the logprobs behind y
        self.embedding: Optional[mx.array] = None  # a lone vision row's first input embedding

    def __len__(self) -> int:
        return len(self.rows)

    # -------------------------------------------------------- join, leave

    def join(self, gen: Request) -> None:
        gen.computed = True
        last, emb = gen.last_input()
        if not self.rows:
            self.cache, self.y, self.embedding = gen.cache, last, emb
        else:
            if len(self.rows) == 1:
                self.cache = [BatchKVCache.merge([c]) for c in self.cache]
            for layer, c in zip(self.cache, gen.cache):
                layer.extend(BatchKVCache.merge([c]))
            self.y = mx.concatenate([self.y, last.astype(self.y.dtype)])
        gen.cache = None  # the batch owns its KV now
        self.rows.append(gen)
        self.logprobs.append(None)

    def own_cache(self, i: int) -> list:
        """Row i's KV as plain per-request caches (for the prompt cache)."""
        if len(self.rows) == 1:
            return self.cache
        return [layer.extract(i) for layer in self.cache]

    def leave(self, gone: list[int]) -> None:
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.rows = [self.rows[i] for i in keep]
        self.logprobs = [self.logprobs[i] for i in keep]
        if not keep:
            self.cache = self.y = self.embedding = None
            return
        self.y = self.y[mx.array(keep)] if len(keep) != self.y.shape[0] else self.y
        if isinstance(self.cache[0], BatchKVCache):
            if len(keep) == 1:  # back to the lone-stream path
                self.cache = [layer.extract(keep[0]) for layer in self.cache]
            else:
                index = mx.array(keep)
                for layer in self.cache:
                    layer.filter(index)

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
        if not self.rows:
            self.cache, self.y = cache, y
        else:
            if len(self.rows) == 1:
                self.cache = [BatchKVCache.merge([c]) for c in self.cache]
            for layer, c in zip(self.cache, cache):
                layer.extend(BatchKVCache.merge([c]))
            self.y = mx.concatenate([self.y, y.astype(self.y.dtype)])
        self.rows.append(gen)
        self.logprobs.append(lp)

    # ---------------------------------------------------------------- step

    def step(self) -> list[tuple[Request, object, Optional[list]]]:
        """Queue the next step, then read this one's tokens. Returns the rows
        that ended: (generation, stop reason or the exception it failed with,
        its own cache)."""
        rows = self.rows
        failures: dict[int, BaseException] = {}
        with mx.stream(generation_stream):
            embedding, self.embedding = self.embedding, None
            try:
                logits = runner.decode(self.model, self.y, self.cache, rows[0] if len(rows) == 1 else None, embedding)
            except BaseException as exc:  # the whole batch fails: every row gets it
                self.leave(list(range(len(rows))))
                return [(gen, exc, None) for gen in rows]
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

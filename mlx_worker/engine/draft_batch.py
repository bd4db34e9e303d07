"""Speculative requests of one (target, draft) pair decoding as one group.

Each round the draft steps run once for all rows, the target verifies every
row's token and drafts in one (rows, k + 1) pass, and each row keeps its own
agreeing prefix; the caches are rewound per row (draft_rewind.py). A lone
speculative request keeps its own group (speculative.py) until another of
its pair comes. Spec: "Speculative decoding" (Batched).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Optional

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import BatchKVCache

from .. import faults
from . import runner
from .draft_rewind import own_end, plain_kv, rewind, sequence, set_to
from .speculative import SpeculativeGroup

log = logging.getLogger("mlx_worker.engine.draft_batch")

# A bench switch (bench/speculative.py --batched), read once: 0 keeps every
# speculative request in a group of its own, as before batching.
BATCHED = os.environ.get("MLX_WORKER_DRAFT_BATCH", "1") != "0"


def place(groups, req) -> list:
    """A speculative request starts decoding: into its pair's batch, with
    the lone requests of its pair that can join (a batch is made for them),
    else in a group of its own. Returns (request, exception) for each that
    could not join: it alone ends with the error. The new request is readied
    first and the batch swapped in only once every join ran, so a failure
    leaves the others decoding as they were."""
    draft, key = req.plan.draft, _key(req) if BATCHED else None
    mine = [g for g in groups.alone if key is not None and _group_key(g) == key]
    if not mine:
        groups.add_alone(draft.group(req))
        return []
    new = SpeculativeGroup(req, draft)
    try:
        new_primed = _ready(new)
    except BaseException as exc:  # the lone groups are untouched: they go on alone
        return [(req, exc)]
    batch = next((g for g in mine if isinstance(g, SpeculativeBatch)), None)
    fresh = batch is None
    if fresh:
        batch = SpeculativeBatch(key, draft)
    lone = [g for g in mine if g is not batch]
    failed = []
    for group in lone + [new]:
        try:
            batch.join(group, new_primed if group is new else _ready(group))
        except BaseException as exc:  # that request only (a lone one's rounds are closed by now)
            failed.append((group.gen, exc))
    kept = [g for g in groups.alone if all(g is not x for x in lone)]
    if fresh and batch.rows:
        kept.insert(groups.alone.index(lone[0]), batch)  # where the first of them decoded
    groups.alone[:] = kept
    return failed


def _ready(group: SpeculativeGroup) -> bool:
    """A request about to join, on its own state only: a lone group's rounds
    closed (a new one's made), its caches set to hold all but its last two
    tokens (draft) or last one (target). Returns whether its prompt's last
    token was accepted already (a lone group's was)."""
    gen, draft = group.gen, group.draft
    group._close()
    primed = group._rounds is not None
    if not primed:
        group._rounds = draft.rounds = group._engine()
        faults.hit("join")  # as a catch-up forward that fails would
    seq, cache, n = sequence(gen), gen.cache, draft.n_target
    set_to(cache[:n], draft.target.model, seq, len(seq) - 1)
    set_to(cache[n:], draft.lm.model, seq, len(seq) - 2)
    return primed


def _group_key(group) -> Optional[tuple]:
    if isinstance(group, SpeculativeBatch):
        return group.key
    if isinstance(group, SpeculativeGroup) and group.rows:
        return _key(group.gen)
    return None


def _key(req) -> Optional[tuple]:
    """What rows must share to decode together; None: this one can't."""
    if req.cache is None or not plain_kv(req.cache) or len(sequence(req)) < 2:
        return None
    d = req.plan.draft
    return id(d.target.model), id(d.lm.model), d.num


class _Row:
    """A request in the batch: its rounds' state (draft_rounds.Rounds, for its
    draft length, processors, keyed sampler and counts) and the tokens the
    draft has not read (``lag``: at least two; the last, ``y``, is the one
    the target reads next)."""

    def __init__(self, gen, draft, rounds, primed: bool):
        self.gen, self.draft, self.rounds = gen, draft, rounds
        self.primed = primed  # its prompt's last token accepted (no output: it is fed by a round)
        seq = sequence(gen)
        self.lag = seq[-2:]
        rounds.context = mx.array(seq[gen.plan.n_prompt - 1 :], mx.uint32)  # its processors' view
        self.pause = rounds.length.plain() if rounds.length.paused else 0  # tokens to decode before a probe

    @property
    def y(self) -> int:
        return self.lag[-1]

    @property
    def wants(self) -> int:
        """Tokens it would draft this round (0 while its draft is paused)."""
        return 0 if self.pause > 0 else self.rounds.length.next()

    @property
    def position(self) -> int:
        return len(self.gen.decoder.sampled)

    @property
    def left(self) -> int:
        return self.gen.plan.max_tokens - self.position


class SpeculativeBatch:
    """Several speculative requests of one (target, draft) pair: one round
    per step for all of them. The cache is one list, target layers then
    draft layers, each a ``BatchKVCache`` (plain caches while one row is
    left). A round drafts the longest draft length any row's acceptance
    asks for, capped by what the rows may still emit; a row whose draft is
    paused is drafted for only when another drafts, and when all are
    paused the round is a plain step (the draft reads the skipped tokens
    when drafting resumes)."""

    batchable = False

    def __init__(self, key: tuple, draft):
        self.key = key
        self.target = draft.target.model
        self.draft_model = draft.lm.model
        self.n = draft.n_target
        self.rows: list = []  # the requests, for the scheduler
        self._rows: list[_Row] = []
        self.cache: Optional[list] = None

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, group: SpeculativeGroup, primed: bool) -> None:
        """A readied request (``_ready``) between rounds, merged as the decode
        batch merges a row; the merged layers are built (and evaluated) aside,
        so a failure leaves the batch as it was."""
        gen = group.gen
        layers = gen.cache
        if self.cache is not None:
            layers = [BatchKVCache.merge([c]) for c in self.cache] if len(self.rows) == 1 else \
                [copy.copy(c) for c in self.cache]  # extend replaces a layer's arrays: the originals stay
            for layer, c in zip(layers, gen.cache):
                layer.extend(BatchKVCache.merge([c]))
            mx.eval([c.state for c in layers])
        row = _Row(gen, group.draft, group._rounds, primed)
        self.cache = layers
        gen.cache = None  # the batch owns its KV now
        self.rows.append(gen)
        self._rows.append(row)
        log.info("speculative batch: %d rows %s", len(self.rows), [g.request_id for g in self.rows])

    def _leave(self, gone: list[int]) -> list:
        """The leaving rows' own caches (in ``gone``'s order); the rest stay."""
        batched = isinstance(self.cache[0], BatchKVCache)
        own = [[c.extract(i) for c in self.cache] if batched else self.cache for i in gone]
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.rows = [self.rows[i] for i in keep]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self.cache = None
        elif batched and len(keep) == 1:
            self.cache = [c.extract(keep[0]) for c in self.cache]
        elif batched:
            index = mx.array(keep)
            for c in self.cache:
                c.filter(index)
        return own

    def step(self) -> list:
        out: list = []
        try:
            ended = self._prime()
            if not ended:
                ended = self._round()
        except BaseException as exc:  # the whole batch fails: every row gets it
            gens = list(self.rows)
            self._leave(list(range(len(gens))))
            return [(gen, exc, None) for gen in gens]
        if ended:
            rows = [self._rows[i] for i, _ in ended]
            caches = self._leave([i for i, _ in ended])
            for row, (_, outcome), cache in zip(rows, ended, caches):
                if isinstance(outcome, str):
                    out.append((row.gen, outcome, own_end(row.gen, row.draft, cache)))
                else:
                    out.append((row.gen, outcome, None))
        return out

    def _prime(self) -> list[tuple[int, object]]:
        """Rows new to decoding accept their prompt's last token (a cancel
        seen there ends them before their first round)."""
        ended = []
        for i, r in enumerate(self._rows):
            if not r.primed:
                r.primed = True
                reason = r.gen.accept(0, None)
                if reason is not None:
                    ended.append((i, reason))
        return ended

    def _length(self) -> int:
        most = max(r.left for r in self._rows) - 1
        return max(0, min(most, max(r.wants for r in self._rows)))

    def _round(self) -> list[tuple[int, object]]:
        """One round for every row; returns (row index, stop reason or
        exception) of the rows that ended."""
        rows, k = self._rows, self._length()
        failed: dict[int, BaseException] = {}
        with mx.stream(generation_stream):
            drafted = self._draft(k, failed)
            fed = mx.array([[r.y] for r in rows], mx.uint32)
            if k:
                fed = mx.concatenate([fed, mx.stack([mx.concatenate(d) for d in drafted])], axis=1)
            logits = runner.forward_rows(self.target, fed, self.cache[: self.n])
            picked = []
            for i, r in enumerate(rows):
                picked.append(_picks(r, logits[i : i + 1], drafted[i], k, failed, i))
            mx.eval([t for p in picked for t, _ in p], *[t for d in drafted for t in d])
        back, ended = [], []
        for i, r in enumerate(rows):
            n, outcome = _settle(r, picked[i], drafted[i], k) if i not in failed else (k, failed[i])
            back.append(k - n)
            if outcome is not None:
                ended.append((i, outcome))
        rewind(self.cache[: self.n], back)
        if k:
            rewind(self.cache[self.n :], back)
        return ended

    def _lag_logits(self) -> mx.array:
        """The draft reads every row's lag (right-padded when they differ,
        the padding then rolled to the left as a batched prefill does);
        logits (B, vocab) at each row's last token."""
        lengths = [len(r.lag) for r in self._rows]
        width = max(lengths)
        fed = mx.array([r.lag + [0] * (width - len(r.lag)) for r in self._rows], mx.uint32)
        cache = self.cache[self.n :]
        ragged = width > min(lengths)
        if ragged:
            for c in cache:
                c.prepare(right_padding=[width - m for m in lengths])
        logits = runner.forward_rows(self.draft_model, fed, cache)
        if ragged:
            for c in cache:
                c.finalize()
        for r in self._rows:
            r.lag = r.lag[-1:]
        return logits[mx.arange(len(lengths)), mx.array(lengths) - 1]

    def _draft(self, k: int, failed: dict) -> list[list]:
        """k draft steps for every row (the first reads each row's lag)."""
        drafted: list[list] = [[] for _ in self._rows]
        fed = None  # the tokens drafted by the previous step, fed to the next
        for j in range(k):
            logits = self._lag_logits() if j == 0 else \
                runner.forward_rows(self.draft_model, fed, self.cache[self.n :])[:, -1, :]
            tokens = []
            for i, r in enumerate(self._rows):
                token = mx.zeros((1,), mx.uint32)
                if i not in failed:
                    try:
                        token = r.rounds._pick(logits[i : i + 1], drafted[i], r.position + j)[0].astype(mx.uint32)
                    except BaseException as exc:  # e.g. a constraint that fails: this row only
                        failed[i] = exc
                drafted[i].append(token)
                tokens.append(token)
            fed = mx.concatenate(tokens)[:, None]
            mx.async_eval(fed)
        return drafted


def _picks(row: _Row, logits: mx.array, drafted: list, k: int, failed: dict, i: int) -> list:
    """The target's choice at each of a row's k + 1 verified positions."""
    if i in failed:
        return []
    try:
        return [row.rounds._pick(logits[:, j, :], drafted[:j], row.position + j) for j in range(k + 1)]
    except BaseException as exc:
        failed[i] = exc
        return []


def _settle(row: _Row, picked: list, drafted: list, k: int) -> tuple[int, object]:
    """A row's outcome of a round: the drafts it keeps (n), the target's
    token after them, its counts; the tokens handed to its request. Returns
    (n, stop reason or exception or None)."""
    rounds, gen = row.rounds, row.gen
    targets = [int(t.item()) for t, _ in picked]
    proposals = [int(d.item()) for d in drafted]
    n = 0
    while n < k and targets[n] == proposals[n]:
        n += 1
    rounds.rounds[min(k, len(rounds.rounds) - 1)] += 1
    rounds.proposed += k
    kept = proposals[:n] + [targets[n]]
    if row.pause > 0:  # drafted for only because others did: the pause goes on
        row.pause = max(0, row.pause - len(kept))
    elif k:
        rounds.length.update(k, n)
        row.pause = rounds.length.plain()  # > 0: drafting does not pay now
    row.lag = ([row.y] + kept)[-2:] if k else row.lag + kept
    rounds.context = mx.concatenate([rounds.context, mx.array(kept, mx.uint32)])
    for j, token in enumerate(kept):
        rounds.accepted += j < n
        try:
            reason = gen.accept(token, picked[j][1][0] if gen.plan.want_logprobs else None)
        except BaseException as exc:
            return n, exc
        if j < n and reason == "eos":  # an EOS is not output: accepted counts output tokens
            row.draft.uncounted += 1
        if reason is not None:
            return n, reason
    return n, None

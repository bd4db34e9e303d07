"""One decode step's llguidance masks for a whole batch, filled in one call.

Rows driven by an llguidance matcher (a constraint; a tool call being written)
take the token fed this step, then one ``LLExecutor`` call fills all their
bitmasks in native threads; where a constraint is a row's first processor its
mask goes into one ``mx.where`` over the (B, vocab) logits. Each row's call
then finds its step done: same masks, same errors as alone. Spec:
protocol/README.md § Batching; bench/constraints.py."""

from __future__ import annotations

import logging
import os

import numpy as np

import mlx.core as mx

from . import mask
from .common import is_engine_panic
from .processor import WORDS, ConstraintProcessor

# Bench switch only (bench/constraints.py compares both): "0" keeps every row
# on its own mask step. Read once, at import.
ENABLED = os.environ.get("MLX_WORKER_BATCH_MASKS", "1") != "0"

log = logging.getLogger("mlx_worker.constraints.batch_masks")
_executor = None
_free: dict[int, mx.array] = {}  # vocab -> an unconstrained row's mask


def prepare(rows: list, logits: mx.array, fed: mx.array) -> mx.array:
    """Before the rows' samplers run on this step's ``logits`` (B, vocab)
    (``fed``: the (B,) tokens the step fed): do the mask step of every row
    driven by llguidance, and return the logits with the masks of the rows
    whose constraint comes first applied. Fewer than two such rows:
    nothing to batch, ``logits`` as given."""
    found = [(i, p) for i, gen in enumerate(rows) if (p := _processor(gen)) is not None]
    if not ENABLED or len(found) < 2:
        return logits
    try:
        return _prepare(rows, found, logits, fed)
    except Exception:
        # fail closed: each row's own call redoes its step (the tokens taken
        # are kept consistently), none passes unmasked logits through
        log.warning("batched masks failed; row by row this step", exc_info=True)
        for _, p in found:
            p.batch_undo()
        return logits


def _prepare(rows: list, found: list, logits: mx.array, fed: mx.array) -> mx.array:
    # the forward pass runs while the matchers work (as each row's own step does)
    mx.async_eval(fed, logits)
    ids = fed.tolist()
    wanted = [(i, p) for i, p in found if p.batch_take(ids[i])]
    _fill([p for _, p in wanted])
    vocab = logits.shape[-1]
    masks: dict[int, mx.array] = {}
    for i, p in found:
        if (isinstance(p.ready, BaseException) or type(p) is not ConstraintProcessor or p.vocab != vocab
                or not _first(rows[i], p)):
            continue  # the row's call applies its mask (WORDS) or raises its failure
        if p.ready is not WORDS and not p.finished:
            continue  # not filled here: its call fills it
        row = p.batch_allowed()  # on the device, reused while unchanged
        if row is not None:
            masks[i] = row
    log.debug("batched masks: %d rows filled in one call, %d applied to the batch's logits", len(wanted), len(masks))
    if not masks:
        return logits
    free = _all_allowed(vocab)
    return mx.where(mx.stack([masks.get(i, free) for i in range(len(rows))]), logits, mask.NEG_INF)


def _all_allowed(vocab: int) -> mx.array:
    if vocab not in _free:
        _free[vocab] = mx.ones((vocab,), dtype=mx.bool_)
    return _free[vocab]


def _fill(procs: list) -> None:
    """Every processor's next-token bitmask, in one call."""
    procs = [p for p in procs if p.words.size == procs[0].words.size] if procs else []  # one tokenizer
    if not procs:
        return
    from llguidance.numpy import fill_next_token_bitmask_par

    words = np.zeros((len(procs), procs[0].words.size), dtype=np.int32)
    try:
        fill_next_token_bitmask_par(_pool(), [(p.m.m, j) for j, p in enumerate(procs)], words)
    except BaseException as exc:
        if not (isinstance(exc, Exception) or is_engine_panic(exc)):
            raise
        # each row's own call fills its mask (and fails alone if it must)
        log.warning("batched mask fill failed: %r; filling row by row", exc)
        return
    for j, p in enumerate(procs):
        p.batch_words(words[j])


def _pool():
    global _executor
    if _executor is None:
        from llguidance import LLExecutor

        _executor = LLExecutor()  # threads: llguidance's default (a share of the cores)
    return _executor


def _processor(gen):
    """The row's llguidance-driven processor (a constraint's, or the lazy
    tool-call grammar's: both have ``batch_take``), or None."""
    plan = getattr(gen, "plan", None)
    for p in plan.processors if plan is not None else ():
        if type(p) is ConstraintProcessor:
            return p if type(p.m).__module__.endswith("llguidance_engine") else None
        if hasattr(p, "batch_take"):
            return p
    return None


def _first(gen, p: ConstraintProcessor) -> bool:
    """Masking first and then the sampling processors (penalties, biases) is
    what the row's own order gives only where the constraint comes first."""
    return gen.plan.processors[0] is p

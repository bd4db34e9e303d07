"""The runner: every forward pass of the engine, and nothing else.

Prompt chunks alone or together, a batch's decode step, the last-token
prime, a draft pair's prefill, speculative rounds' passes (``forward``; what
they feed: draft_rounds.py). It never admits, evicts or finishes: the
scheduler decides, the runner runs. Spec: "Batching". A decode step that packs
(``decode_packed``) may carry a prompt chunk too: one mixed pass.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import BatchKVCache

from .. import faults
from . import packed
from .request import Request


def set_positions(req: Request) -> None:
    """Vision: tell the language model this request's positions (set before each of its calls)."""
    if req.lm.vision is not None:
        req.lm.model.begin(req.positions)


def set_row_positions(rows: list[Request]) -> None:
    """Vision: each row's positions for a batch's decode call (vision/lm.py's ``begin_batch``)."""
    if rows[0].lm.vision is not None:
        rows[0].lm.model.begin_batch([r.positions for r in rows])


def first_step(req: Request) -> mx.array:
    """A vision row's first decode step alone, before it joins a batch: the
    prompt's last token with its positions, embedding and whole-prompt
    inputs, exactly as a solo run feeds it. Logits (1, vocab), queued."""
    last, emb = req.last_input()
    set_positions(req)
    kwargs = {"input_embeddings": emb[None]} if emb is not None else {}
    return req.lm.model(last[None], cache=req.cache, **kwargs)[:, -1, :]


def prefill(req: Request, n: int, clear_cache: bool = True) -> None:
    """Process the request's next ``n`` prompt tokens (never the last one).
    ``clear_cache``: free MLX's buffer cache after the chunk, as mlx-lm
    does; not while other streams decode (their next step would have to
    allocate its buffers afresh)."""
    n = req.next_chunk(n)
    if n <= 0:
        return
    req.computed = True
    faults.hit("prefill")
    start = req.processed - req.cached  # into the uncached part
    tokens = mx.array(req.prompt.tokens[req.processed : req.processed + n], dtype=mx.uint32)
    set_positions(req)
    draft = req.plan.draft
    if draft is not None:
        _prefill_pair(draft, tokens, req.cache)
    else:
        kwargs = {}
        if req.embeddings is not None:
            kwargs["input_embeddings"] = req.embeddings[start : start + n][None]
        req.lm.model(tokens[None], cache=req.cache, **kwargs)
    mx.eval([c.state for c in req.cache])
    req.prefilled(n, req.cache)
    if clear_cache:
        mx.clear_cache()


def _prefill_pair(draft, tokens: mx.array, cache: list) -> None:
    """The same prompt tokens through the target and its draft (one cache list, target layers first)."""
    draft.target.model(tokens[None], cache=cache[: draft.n_target])
    # one model's chunk at a time: their temporaries never add up (memory_model.py)
    mx.eval([c.state for c in cache[: draft.n_target]])
    draft.lm.model(tokens[None], cache=cache[draft.n_target :])


def prefill_together(model, reqs: list[Request], n: int) -> None:
    """One forward pass for the next (up to) ``n`` prompt tokens of several
    requests of one model, as mlx-lm's BatchGenerator prefills: their caches
    merged (left-padded), shorter inputs right-padded, the padding rolled to
    the left afterwards; then each request's own cache is extracted again."""
    for r in reqs:
        r.computed = True
    tokens = [r.pending_tokens(n) for r in reqs]
    lengths = [len(t) for t in tokens]
    width = max(lengths)
    padding = [width - k for k in lengths]
    cache = [BatchKVCache.merge([r.cache[i] for r in reqs]) for i in range(len(reqs[0].cache))]
    inputs = mx.array([t + [0] * p for t, p in zip(tokens, padding)], dtype=mx.uint32)
    if max(padding):
        for c in cache:
            c.prepare(lengths=lengths, right_padding=padding)
    with mx.stream(generation_stream):
        model(inputs, cache=cache)
        if max(padding):
            for c in cache:
                c.finalize()
        mx.eval([c.state for c in cache])
    for i, (r, k) in enumerate(zip(reqs, lengths)):
        r.prefilled(k, [c.extract(i) for c in cache])


def prime(req: Request) -> None:
    """max_tokens 0: feed the prompt's last token (the cache then holds the
    whole prompt, as mlx-lm leaves it)."""
    req.computed = True
    last, emb = req.last_input()
    set_positions(req)
    kwargs = {"input_embeddings": emb[None]} if emb is not None else {}
    req.lm.model(last[None], cache=req.cache, **kwargs)
    mx.eval([c.state for c in req.cache])


def forward(model, tokens: mx.array, cache: list) -> mx.array:
    """One row's pass over ``tokens`` (1-D): logits (1, len, vocab). The
    passes of speculative rounds (draft steps, the verify of y and the
    drafts, the draft's catch-up) go through here; draft_rounds.py decides
    what each one feeds."""
    return model(tokens[None], cache=cache)


def forward_rows(model, tokens: mx.array, cache: list) -> mx.array:
    """Several rows' pass over ``tokens`` (B, len): logits (B, len, vocab);
    batched speculative rounds' draft steps and verify (draft_batch.py)."""
    return model(tokens, cache=cache)


def decode(model, y: mx.array, cache: list, lone: Optional[Request], embedding: Optional[mx.array]) -> mx.array:
    """One decode step of a batch's rows: logits (B, vocab) for the tokens
    ``y`` (B,), queued on the generation stream (the caller samples, then
    reads the previous step's tokens while this one runs). ``lone``: the
    only row, whose positions are set first; ``embedding``: its first input's."""
    if lone is not None:
        set_positions(lone)
    kwargs = {"input_embeddings": embedding[None]} if embedding is not None else {}
    return model(y[:, None], cache=cache, **kwargs)[:, -1, :]


def decode_packed(model, y: mx.array, segments: list[tuple[int, list]],
                  chunks: Optional[list[tuple[Request, int]]]) -> mx.array:
    """One packed pass (packed.py) of a batch whose rows are in segments
    (rows, their shared cache layers): logits (B, vocab) for the tokens
    ``y`` (B,). ``chunks``: prompts' next tokens (request, n), processed in
    the same pass (their fault points were hit by the scheduler's turn)."""
    spans, caches, tokens = [(1, b) for b, _ in segments], [c for _, c in segments], [y.astype(mx.uint32)]
    for req, n in reversed(chunks or []):  # chunks first, in order
        req.computed = True
        tokens.insert(0, mx.array(req.pending_tokens(n), dtype=mx.uint32))
        spans.insert(0, (n, 1))
        caches.insert(0, req.cache)
    logits = packed.forward(model, mx.concatenate(tokens), spans, caches, last=y.shape[0])[0, -y.shape[0]:, :]
    for req, n in chunks or []:
        req.prefilled(n, req.cache)
    return logits

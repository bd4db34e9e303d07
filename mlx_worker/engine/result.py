"""A generate's final result: assembled from what its request holds.

``assemble`` builds a finished request's result; ``cancelled`` the result
of one cancelled before it could finish normally (spec: "`cancel`"),
from what its token events delivered (``Streamed``). No MLX here: the job
table answers a queued generate with it before MLX is imported.
"""

from __future__ import annotations

from typing import Optional

from .. import protocol
from ..tools.base import new_call_id


class Streamed:
    """The token events a request sent, by channel (tool calls by index)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.tokens: list[int] = []
        self.channels: dict[str, list[str]] = {"content": [], "reasoning": []}
        self.calls: dict[int, list[str]] = {}  # tool_call_index -> its text so far

    def record(self, event: protocol.TokenEvent) -> None:
        self.text.append(event.text)
        self.tokens.extend(event.tokens)
        if event.channel == "tool_call" and isinstance(event.tool_call_index, int):
            self.calls.setdefault(event.tool_call_index, []).append(event.text)
        else:
            self.channels.get(event.channel, []).append(event.text)


def cancelled(params: protocol.GenerateParams, streamed: Optional[Streamed] = None,
              queue_ms: float = 0.0) -> protocol.GenerateResult:
    """The result of a generate cancelled before it finished normally: while
    queued (nothing produced), or when its work failed after the cancel
    (then with what the token events delivered). A tool call whose text was
    streamed is never parsed here: it is reported as incomplete."""
    streamed = streamed or Streamed()
    tokens = list(streamed.tokens)
    invalid = [
        protocol.InvalidToolCall(id=new_call_id(), text="".join(streamed.calls[i]), reason="incomplete",
                                 error="the output ended inside this call (cancel)")
        for i in sorted(streamed.calls)
    ]
    text = "".join(streamed.text)
    return protocol.GenerateResult(
        text=text,
        tokens=tokens,
        stop_reason="cancelled",
        usage=protocol.Usage(prompt_tokens=0, cached_tokens=0, completion_tokens=len(tokens)),
        timings=protocol.Timings(ttft_ms=0.0, prompt_tps=0.0, generation_tps=0.0, total_ms=0.0,
                                 queue_ms=queue_ms),
        peak_memory=0,
        model_id=params.model_id or "",
        seed=params.seed if params.seed is not None else 0,
        content="".join(streamed.channels["content"]),
        reasoning="".join(streamed.channels["reasoning"]),
        tool_calls=[],
        invalid_tool_calls=invalid,
    )


def queue_ms(received: float, started: float) -> float:
    return round(max(0.0, started - received) * 1000, 3)


def assemble(req, stop_reason: str, end: float, calls: list, invalid_calls: list, complete,
             peak_memory: int) -> protocol.GenerateResult:
    """A finished request's result (``req``: engine.request.Request; ``end``: when its output ended)."""
    plan, dec = req.plan, req.decoder
    first = dec.first_token_at
    prefill_s = (first or end) - req.start
    decode_s = end - (first or end)
    uncached = plan.n_prompt - req.cached
    usage = protocol.Usage(prompt_tokens=plan.n_prompt, cached_tokens=req.cached,
                           completion_tokens=len(dec.generated))
    if plan.draft is not None:
        usage.draft_tokens, usage.accepted_draft_tokens = plan.draft.proposed, plan.draft.accepted
        usage.draft_rounds = list(plan.draft.lengths)
    return protocol.GenerateResult(
        text=dec.text,
        tokens=dec.generated,
        stop_reason=stop_reason,  # type: ignore[arg-type]
        usage=usage,
        timings=protocol.Timings(
            ttft_ms=round(prefill_s * 1000, 3) if first else 0.0,
            prompt_tps=round(uncached / prefill_s, 2) if first and prefill_s > 0 else 0.0,
            generation_tps=round((len(dec.sampled) - 1) / decode_s, 2)
            if len(dec.sampled) > 1 and decode_s > 0 else 0.0,
            total_ms=round((end - req.start) * 1000, 3),
            queue_ms=queue_ms(req.received, req.start),
        ),
        peak_memory=peak_memory,
        model_id=req.lm.model_id,
        seed=plan.seed,
        content=dec.channels.texts["content"],
        reasoning=dec.channels.texts["reasoning"],
        tool_calls=calls,
        invalid_tool_calls=invalid_calls,
        stop_string=dec.stream.stop_string,
        stop_token=dec.stop_token,
        constraint_complete=complete,
        memory_estimate=req.memory_estimate,
    )

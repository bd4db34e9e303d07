"""Sampled tokens -> token events: exact text, channels, stop checks.

The decoder reads a request's tokens as they are produced (it knows nothing
of how they were: batch rows or draft rounds), sends their token events and
says when the output ends ("eos", "stop_string", "max_tokens", "cancelled").
Spec: "`token`", "`generate`", "Channels".
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import mlx.core as mx

from .. import protocol, sampling
from ..textstream import TextStream
from ..tools.channels import ChannelSplitter
from .plan import Plan
from .result import Streamed


class Decoder:
    def __init__(self, lm, params: protocol.GenerateParams, plan: Plan, request_id,
                 send: Callable[[protocol.TokenEvent, Callable], None], should_stop: Callable[[], bool]):
        self.plan = plan
        self.request_id = request_id
        self._send = send
        self.should_stop = should_stop
        self.stream = TextStream(lm.decode, plan.prompt.tokens, sampling.stop_strings(params))
        self.channels = ChannelSplitter.for_model(lm.tokenizer, plan.prompt.tokens)
        self.generated: list[int] = []  # returned tokens (no terminating EOS)
        self.sampled: list[int] = []  # every sampled token, EOS included: they are in the KV cache
        self.text_parts: list[str] = []
        self.stop_token: Optional[int] = None
        self.first_token_at: Optional[float] = None
        self.streamed = Streamed()  # what the token events delivered (a cancelled result's content)

    def accept(self, token: int, logprobs: Optional[mx.array]) -> Optional[str]:
        """A sampled token, now read; the stop reason when the output ends here, else None."""
        plan = self.plan
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.sampled.append(token)
        if plan.observe is not None:
            plan.observe(token)
        if token in plan.eos_ids or token in plan.stop_ids:
            self.stop_token = token
            return "eos"
        self.generated.append(token)
        text = self.stream.push(token)
        self.text_parts.append(text)
        logprob = [_logprob(token, logprobs, plan.top_logprobs)] if plan.want_logprobs else protocol.UNSET
        self._send_pieces(self.channels.push(text, token), [token], logprob)
        if self.stream.stopped:
            return "stop_string"
        if len(self.sampled) >= plan.max_tokens:
            return "max_tokens"
        if self.should_stop():
            return "cancelled"
        return None

    def finish(self, stop_reason: str) -> str:
        """Flush the held text; the stop reason, unless a stop string ending
        in held-back bytes shows only now (it was complete before whatever
        token ended the loop)."""
        tail = self.stream.finish()
        self.text_parts.append(tail)
        pieces = self.channels.push(tail) + self.channels.finish()
        if pieces:
            self._send_pieces(pieces, [], protocol.UNSET)
        if self.stream.stopped and stop_reason != "cancelled":
            stop_reason, self.stop_token = "stop_string", None
        return stop_reason

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def _send_pieces(self, pieces, tokens: list[int], logprobs) -> None:
        """One token event per channel piece; the first carries the token (and
        its logprobs). A token whose text is held still gets its event."""
        if not pieces:
            pieces = [self.channels.empty_piece()]
        for i, piece in enumerate(pieces):
            event = protocol.TokenEvent(id=self.request_id, text=piece.text, tokens=tokens if i == 0 else [],
                                        logprobs=logprobs if i == 0 else protocol.UNSET, channel=piece.channel)
            if piece.call is not None:
                event.tool_call_index = piece.call
            self._send(event, self.streamed.record)


def _logprob(token: int, logprobs: mx.array, top: int) -> protocol.TokenLogprob:
    entry = protocol.TokenLogprob(token=token, logprob=logprobs[token].item())
    top = min(top, logprobs.shape[-1])  # a vocabulary smaller than top_logprobs
    if top > 0:
        ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
        values = logprobs[ids].tolist()
        # A constraint masks tokens to -inf: they are not candidates.
        pairs = sorted(((t, v) for t, v in zip(ids.tolist(), values) if v != float("-inf")), key=lambda p: -p[1])
        entry.top = [protocol.TopLogprob(token=t, logprob=v) for t, v in pairs]
    return entry

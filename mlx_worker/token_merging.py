"""Consecutive ``token`` events of one request, channel and tool call merged into one line.

The writer (transport.LineWriter) hands over what piled up while the host was
slow to read; nothing is reordered or dropped, marker events never merge.
Spec: protocol/README.md § Ordering and concurrency.
"""

from __future__ import annotations

import msgspec

from . import protocol


def coalesce(batch: list) -> list:
    """Merge runs of token events of one request, channel and call; keep
    everything in order.

    Each run is joined once (linear in its length): after a long stall the
    batch can hold many thousands of events."""
    out: list = []
    run: list = []

    def flush() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            out.append(protocol.Notification("token", _merge([m.params for m in run])))
        run.clear()

    for message in batch:
        if isinstance(message, protocol.Notification) and message.method == "token":
            if run and not _same_stream(run[-1].params, message.params):
                flush()
            run.append(message)
        else:
            flush()
            out.append(message)
    flush()
    return out


def _same_stream(a: protocol.TokenEvent, b: protocol.TokenEvent) -> bool:
    # Events merge only within one request's channel (and tool call); a
    # marker event stays one marker ('</tool_call>', '<tool_call>': two events).
    return (a.id == b.id and a.channel == b.channel and a.channel != "marker"
            and a.tool_call_index == b.tool_call_index)


def _merge(events: list) -> protocol.TokenEvent:
    merged = protocol.TokenEvent(
        id=events[0].id,
        text="".join(e.text for e in events),
        tokens=[t for e in events for t in e.tokens],
        channel=events[0].channel,
        tool_call_index=events[0].tool_call_index,
    )
    if any(e.logprobs is not msgspec.UNSET for e in events):
        merged.logprobs = [lp for e in events if e.logprobs for lp in e.logprobs]
    return merged

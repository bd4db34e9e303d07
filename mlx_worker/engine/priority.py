"""Priorities: interactive requests go ahead of background ones.

A generate's ``priority`` orders the waiting-for-memory queue and the prefill
turns (arrival order within a priority), picks the request preemption pauses
first, and keeps a paused background request out while interactive work waits.
Without ``priority`` every request is interactive: arrival order, as before.
Spec: "Batching" (priorities).
"""

from __future__ import annotations

from typing import Iterable

INTERACTIVE = "interactive"
BACKGROUND = "background"


def of(req) -> str:
    params = getattr(req, "params", None)
    return getattr(params, "priority", INTERACTIVE)


def interactive(req) -> bool:
    return of(req) != BACKGROUND


def enqueue(queue, req) -> None:
    """``req`` joins ``queue`` behind every request of its priority and ahead
    of every background one when it is interactive (a deque, oldest first)."""
    if not interactive(req):
        queue.append(req)
        return
    at = next((i for i, r in enumerate(queue) if not interactive(r)), len(queue))
    queue.insert(at, req)


def behind(queue: Iterable, req) -> bool:
    """Whether ``req`` must wait behind a request already queued: one of its
    own priority or higher (arrival order within a priority)."""
    return any(interactive(r) or not interactive(req) for r in queue)


def peek(queue):
    """The request ``next_turn`` would take, left in the queue."""
    return next((r for r in queue if interactive(r)), queue[0])


def next_turn(queue):
    """Take the request whose prompt chunk runs next: the first interactive
    one, else the first (a background prefill yields between chunks)."""
    req = peek(queue)
    queue.remove(req)
    return req


def waiting_interactive(queue: Iterable) -> bool:
    return any(interactive(r) for r in queue)


def background_waits(prefilling: Iterable, groups: Iterable) -> bool:
    """With only background prompts to prefill: whether their chunk waits a
    step because an interactive request's first token is still to come out
    (the decode step emits the token its first step sampled)."""
    if any(interactive(r) for r in prefilling):
        return False
    return any(interactive(r) and r.decoder is not None and not r.decoder.generated
               for group in groups for r in group.rows)

"""Bounds on preparing a prompt: a chat template's time and output, cancel,
and what may run on the compute thread.

A template render runs under a trace hook that ends it at the deadline or a
cancel, and its output stops at ``MAX_RENDERED_CHARS``. On the compute thread
the budget is short and big texts are not tokenized: ``MustOffload`` sends
that work to the prompt thread (offload.py). Spec: protocol/README.md § Chat templates.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from .errors import invalid_params

RENDER_SECONDS = 10.0  # a template taking longer is refused (-32602 params.messages)
MAX_RENDERED_CHARS = 32 * 1024 * 1024
INLINE_SECONDS = 0.2  # a render on the compute thread taking longer is moved off it
INLINE_CHARS = 256 * 1024  # a text longer than this is tokenized off the compute thread


class MustOffload(Exception):
    """Too long for the compute thread: redo it on the prompt thread."""


class RenderStopped(Exception):
    """The request was cancelled while its template rendered."""


class _Limit(Exception):
    pass


@dataclass
class Bounds:
    seconds: float = RENDER_SECONDS
    should_stop: Callable[[], bool] = lambda: False
    inline: bool = False


_local = threading.local()


def current() -> Bounds:
    return getattr(_local, "bounds", None) or Bounds()


@contextlib.contextmanager
def within(should_stop: Callable[[], bool], inline: bool) -> Iterator[None]:
    """Prompt work in this block runs under these bounds (this thread only)."""
    before = getattr(_local, "bounds", None)
    _local.bounds = Bounds(INLINE_SECONDS if inline else RENDER_SECONDS, should_stop, inline)
    try:
        yield
    finally:
        _local.bounds = before


def check_encode(text: str) -> None:
    """Before tokenizing ``text``: a big one leaves the compute thread."""
    if current().inline and len(text) > INLINE_CHARS:
        raise MustOffload


def render(fn: Callable[[], str], templates: Iterable[str]) -> str:
    """``fn()`` (a chat-template render) within the current bounds."""
    bounds = current()
    for template in templates:
        _bound_output(template)
    deadline = time.monotonic() + bounds.seconds
    stop = bounds.should_stop

    def trace(frame, event, arg):  # a Python call, or a generator resumed: every loop pass of a render
        if event == "call":
            if stop():
                raise RenderStopped
            if time.monotonic() > deadline:
                raise _Limit(f"rendering took longer than {bounds.seconds:g} s")
        return None

    previous = sys.gettrace()
    _local.max_chars = MAX_RENDERED_CHARS
    sys.settrace(trace)
    try:
        return fn()
    except _Limit as exc:
        if bounds.inline and "longer" in str(exc):
            raise MustOffload from None
        raise invalid_params("params.messages", f"chat template failed: {exc}") from None
    except RenderStopped:
        raise
    except Exception as exc:  # jinja errors, template-raised exceptions
        raise invalid_params("params.messages", f"chat template failed: {exc}") from None
    finally:
        sys.settrace(previous)
        _local.max_chars = None


def _bounded_concat(pieces: Iterable[str]) -> str:
    limit = getattr(_local, "max_chars", None)
    if limit is None:
        return "".join(pieces)
    out, n = [], 0
    for piece in pieces:
        n += len(piece)
        if n > limit:
            raise _Limit(f"rendering produced more than {limit} characters")
        out.append(piece)
    return "".join(out)


def _bound_output(template: Any) -> None:
    """Make the compiled template (transformers caches one per template
    string) join its output through ``_bounded_concat``."""
    if not isinstance(template, str):
        return
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        env = _compile_jinja_template(template).environment
    except Exception:  # a template that doesn't compile fails in the render itself
        return
    if env.concat is not _bounded_concat:
        env.concat = _bounded_concat

"""Bytes on pipes: line framing in, serialized line writes out.

Knows nothing of MLX or of methods. The reader splits stdin into lines without
ever holding an oversized line whole; the writer owns a private duplicate of
the original stdout, so nothing else in the process can write protocol bytes.
Spec: protocol/README.md § Framing, § Stopping, signals and a misbehaving host.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import selectors
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Union

import msgspec

from . import errors, protocol

log = logging.getLogger("mlx_worker.transport")

READ_CHUNK = 1 << 16
OVERSIZE_HEAD = 512
# While idle, how often the writer checks that the host still reads stdout.
IDLE_CHECK_S = 0.25
# A stdin read error other than EAGAIN/EINTR is retried this often (after
# READ_RETRY_S, 2 x READ_RETRY_S, ...) before the worker stops.
READ_RETRIES = 3
READ_RETRY_S = 0.05


@dataclass
class Oversized:
    """A line longer than the limit: only its head was kept (to find its id)."""

    head: bytes
    size: int


def protect_stdout() -> int:
    """Duplicate fd 1 for the protocol and point fd 1 and sys.stdout at stderr.

    After this, a print() from Python or a printf() from C lands on stderr,
    never in the protocol stream.
    """
    proto_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto_fd


def read_lines(
    fd: int, max_line_bytes: int, on_idle: Callable[[bool], None] = lambda idle: None
) -> Iterator[Union[bytes, Oversized]]:
    """Yield each line of ``fd`` (without its newline) until EOF.

    A line over ``max_line_bytes`` is yielded as ``Oversized`` once its newline
    arrives; its bytes past the head are dropped as they are read.
    ``on_idle(True)`` is called before each (blocking) read, when every line
    read so far has been yielded, and ``on_idle(False)`` after it.
    """
    buf = bytearray()
    skipping: Oversized | None = None
    while True:
        on_idle(True)
        chunk = _read_chunk(fd)
        on_idle(False)
        if not chunk:
            if skipping is not None:
                yield skipping
            elif buf.strip():
                yield bytes(buf)  # a last line without its newline
            return
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            piece = chunk[start:] if nl < 0 else chunk[start:nl]
            if skipping is not None:
                skipping.size += len(piece)
            else:
                buf += piece
                if len(buf) > max_line_bytes:
                    skipping = Oversized(bytes(buf[:OVERSIZE_HEAD]), len(buf))
                    buf.clear()
            if nl < 0:
                break
            if skipping is not None:
                yield skipping
                skipping = None
            else:
                line = bytes(buf)
                buf.clear()
                if line.strip():
                    yield line
            start = nl + 1


def _read_chunk(fd: int) -> bytes:
    """The next bytes of ``fd``; ``b""`` only at the end of input, or when
    reading keeps failing (logged): either way the worker stops cleanly."""
    failures = 0
    while True:
        try:
            return os.read(fd, READ_CHUNK)
        except BlockingIOError:
            # A non-blocking pipe (a host may hand one over): nothing to read
            # yet is not the end of input. Wait until there is.
            _wait_for(fd, selectors.EVENT_READ)
        except InterruptedError:
            continue
        except OSError as exc:
            failures += 1
            if failures > READ_RETRIES:
                log.error("reading stdin failed %d times (%s): stopping as at end of input", failures, exc)
                return b""
            log.warning("reading stdin failed (%s); retrying", exc)
            time.sleep(READ_RETRY_S * failures)


def _wait_for(fd: int, events: int) -> None:
    """Block until ``fd`` is ready (``selectors.EVENT_READ`` or
    ``EVENT_WRITE``), failed or hung up: the next read or write says which."""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, events)
        selector.select()


class LineWriter:
    """Serializes every outgoing message onto the protocol fd, one per line.

    Messages are queued by any thread and written by one writer thread, in
    order. What piled up while the host was slow to read goes through
    ``coalesce`` first (the layer above decides which messages may merge:
    token_merging.py), so a slow reader costs the generation loop nothing.
    """

    def __init__(self, fd: int, on_broken: Callable[[], None],
                 coalesce: Callable[[list], list] = lambda batch: batch):
        self._fd = fd
        self._on_broken = on_broken
        self._coalesce = coalesce
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self.broken = False
        self._encoder = msgspec.json.Encoder()
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self._thread.start()

    def send(self, message: object) -> None:
        with self._cond:
            if self._closed:
                return
            self._queue.append(message)
            self._cond.notify()

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is written (or the pipe broke)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self.broken or (not self._queue and not self._busy), timeout
            )

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                ready = self._cond.wait_for(lambda: bool(self._queue) or self._closed, IDLE_CHECK_S)
                if ready:
                    if not self._queue:
                        return
                    batch = list(self._queue)
                    self._queue.clear()
                    self._busy = True
            if not ready:
                # A host that closed stdout while the worker is idle would
                # otherwise go unnoticed until the next write.
                if reader_gone(self._fd):
                    self._fail(BrokenPipeError(errno.EPIPE, "the host closed stdout"))
                    return
                continue
            try:
                data = b"".join(self._encode(m) for m in self._coalesce(batch))
                self._write_all(data)
            except OSError as exc:
                self._fail(exc)
                return
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _encode(self, message: object) -> bytes:
        if isinstance(message, bytes):
            return message
        try:
            return self._encoder.encode(message) + b"\n"
        except Exception as exc:
            # A bug upstream must cost one message, not the writer thread (and
            # with it every later reply). A reply still answers its request.
            log.error("could not encode a %s: %s", type(message).__name__, exc)
            if isinstance(message, (protocol.Response, protocol.ErrorResponse)):
                fallback = protocol.error_response(
                    message.id, errors.INTERNAL_ERROR, f"internal error: the reply could not be encoded: {exc}")
                return self._encoder.encode(fallback) + b"\n"
            return b""

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                # A non-blocking pipe that is full: the host reads slowly,
                # which is no broken pipe. Wait as a blocking write would.
                _wait_for(self._fd, selectors.EVENT_WRITE)
                continue
            view = view[n:]

    def _fail(self, exc: OSError) -> None:
        with self._cond:
            self.broken = True
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        if exc.errno not in (errno.EPIPE, errno.EBADF):
            log.error("protocol write failed: %s", exc)
        self._on_broken()


def reader_gone(fd: int) -> bool:
    """True when nobody can read ``fd`` any more (a pipe whose read end was
    closed reports POLLERR; a closed socket POLLHUP)."""
    try:
        poller = select.poll()
        poller.register(fd, 0)  # errors and hang-ups are always reported
        return any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() on this platform
        return False

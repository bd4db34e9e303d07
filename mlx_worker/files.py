"""Paths a host names, and reading files without ever blocking on them.

Every path in a request must be absolute, nothing is expanded; it is checked
with ``stat`` before anything opens it, only a regular file is read, opened
non-blocking (a FIFO, a device, ``/dev/stdin`` are refused). Callers turn a
``PathProblem`` into their method's error code.
Spec: protocol/README.md § Paths, numbers and logits.
"""

from __future__ import annotations

import os
import stat


class PathProblem(Exception):
    """Why a path can't be used: ``reason`` is a wire word (see protocol/README.md)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def check_path(raw: str) -> str:
    """The path itself, if it is one the worker accepts: absolute, no NUL."""
    if "\x00" in raw:
        raise PathProblem("invalid_path", f"the path contains a NUL character: {raw!r}")
    if not os.path.isabs(raw):
        raise PathProblem("relative_path", f"paths must be absolute: {raw!r}")
    return raw


def stat_of(path: str) -> os.stat_result:
    """``os.stat`` (following links) with failures as a PathProblem."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise PathProblem("not_found", f"not found: {path}") from None
    except NotADirectoryError:
        raise PathProblem("not_found", f"not found (a parent is not a folder): {path}") from None
    except OSError as exc:  # name too long, permission, loop of links...
        raise PathProblem("unreadable", f"cannot use {path}: {exc.strerror or exc}") from None


def check_regular(path: str) -> os.stat_result:
    """Stat ``path`` and refuse anything that is not a regular file."""
    st = stat_of(path)
    if stat.S_ISDIR(st.st_mode):
        raise PathProblem("unreadable", f"the path is a folder: {path}")
    if not stat.S_ISREG(st.st_mode):
        raise PathProblem("not_a_file", f"not a regular file (a FIFO, device or socket is never read): {path}")
    return st


def read_regular(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file, at most ``max_bytes + 1`` of them (a
    caller compares with its limit: a file that grows stays bounded)."""
    check_regular(path)
    try:
        # Non-blocking, and checked again on the open descriptor: the path
        # may have been swapped for a FIFO between the stat and the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise PathProblem("unreadable", f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PathProblem("not_a_file", f"not a regular file: {path}")
        if st.st_size > max_bytes:
            raise FileTooLarge(st.st_size)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            # Never ask for more than the file holds: read(n) allocates n bytes.
            return fh.read(min(max_bytes, st.st_size) + 1)
    except (PathProblem, FileTooLarge):
        raise
    except OSError as exc:
        raise PathProblem("unreadable", f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)


class FileTooLarge(Exception):
    """The file is larger than the caller's limit (``size`` bytes)."""

    def __init__(self, size: int):
        super().__init__(size)
        self.size = size

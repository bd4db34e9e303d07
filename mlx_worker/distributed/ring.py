"""The ranks of this worker's distributed group, as rank 0 sees them: at most one
ring per worker (MLX creates its global group once), started by the first
distributed load; followers read JSON operations on stdin and send heartbeats
on stdout; one that exits or goes silent fails the ring and every follower is
killed (bench/results/design-notes.md, "models").
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

import msgspec

from .. import errors, mlx_stuck, protocol
from ..errors import WorkerError

log = logging.getLogger("mlx_worker.distributed")

BACKENDS = ["ring"]  # what this build can start (JACCL and MPI need hosts set up by the user)
HEARTBEAT_S = 0.2
INIT_TIMEOUT_S = 120.0  # followers start (import MLX, ssh) and connect
# After the group failed, rank 0's forward pass still running this long is
# stuck in MLX for good: its ring backend can leave a collective waiting
# forever once a peer is lost (a socket's thread fails the tasks pending on it
# after 10 errors and exits; one queued later is never resolved).
STUCK_S = 3.0
LOOPBACK = ("127.0.0.1", "localhost")


class RingFailed(WorkerError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unread(pipe) -> bool:
    """Bytes wait in the pipe (the rank is alive; its reader is behind)."""
    try:
        return bool(select.select([pipe], [], [], 0)[0])
    except (OSError, ValueError):
        return False


class Follower:
    def __init__(self, rank: int, proc: subprocess.Popen):
        self.rank = rank
        self.proc = proc
        self.last_seen = time.monotonic()
        self.replies: queue.Queue = queue.Queue()

    def read(self) -> None:
        for line in self.proc.stdout:
            self.last_seen = time.monotonic()
            if line.strip() != b"h":
                self.replies.put(json.loads(line))
        self.replies.put(None)  # EOF


class Ring:
    def __init__(self, size: int, hosts: list[str], backend: str, timeout_s: float):
        self.size = size
        self.hosts = hosts
        self.backend = backend
        self.timeout_s = timeout_s
        self.followers: list[Follower] = []
        self.failure: Optional[str] = None
        self.group = None
        self.init_started = False  # MLX's one group per process: once tried, never again
        self._lock = threading.Lock()  # one writer of operations at a time
        self._frees: list[int] = []
        self._next_id = 0
        self._closing = False
        self.forward_since: Optional[float] = None  # rank 0's forward pass in flight since (mirror.py)
        self._failed_at = 0.0

    # ------------------------------------------------------------ start

    def start(self) -> None:
        import mlx.core as mx

        addresses = self.hosts or [f"127.0.0.1:{_free_port()}" for _ in range(self.size)]
        fd, hostfile = tempfile.mkstemp(prefix="mlx-worker-hosts-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump([[a] for a in addresses], f)
        self.hostfile = hostfile
        for rank in range(1, self.size):
            host = addresses[rank].rsplit(":", 1)[0]
            env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=hostfile)
            cmd = [sys.executable, "-m", "mlx_worker", "--role", "follower",
                   "--log-level", logging.getLevelName(logging.getLogger("mlx_worker").getEffectiveLevel()).lower()]
            if host not in LOOPBACK:
                # Another machine: the same interpreter path and project there
                # (as mlx.launch assumes); the hostfile is sent on its command line.
                hosts_json = json.dumps([[a] for a in addresses])
                cmd = ["ssh", host, f"f=$(mktemp) && echo '{hosts_json}' > $f && MLX_RANK={rank} "
                                    f"MLX_HOSTFILE=$f exec {' '.join(cmd)}"]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            follower = Follower(rank, proc)
            self.followers.append(follower)
            threading.Thread(target=follower.read, name=f"rank{rank}-reader", daemon=True).start()
        threading.Thread(target=self._watch, name="ring-watchdog", daemon=True).start()
        os.environ["MLX_RANK"] = "0"
        os.environ["MLX_HOSTFILE"] = hostfile
        # init blocks until every rank has connected, forever if one never
        # does: it runs on a thread of its own, so the compute thread can
        # give up (a follower that exited, or the deadline).
        outcome: list = []

        def init() -> None:
            try:
                outcome.append(mx.distributed.init(strict=True, backend=self.backend))
            except BaseException as exc:
                outcome.append(exc)

        self.init_started = True
        threading.Thread(target=init, name="ring-init", daemon=True).start()
        deadline = time.monotonic() + INIT_TIMEOUT_S
        while not outcome:
            self.check()
            if time.monotonic() > deadline:
                raise self.fail(f"the ranks did not connect within {INIT_TIMEOUT_S:.0f} s")
            time.sleep(0.02)
        if isinstance(outcome[0], BaseException):
            raise self.fail(f"the group could not be set up: {outcome[0]}")
        self.group = outcome[0]
        self.check()
        if self.group.size() != self.size:
            raise self.fail(f"the group has {self.group.size()} ranks, not {self.size}")

    # ------------------------------------------------------- operations

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def free(self, list_id: int) -> None:
        """A cache list rank 0 no longer holds (called from __del__, any thread)."""
        self._frees.append(list_id)

    def send(self, op: dict) -> None:
        """One operation to every follower, in order."""
        self.check()
        with self._lock:
            frees, self._frees = self._frees, []
            lines = b""
            if frees:
                lines += msgspec.json.encode({"op": "free", "lists": frees}) + b"\n"
            lines += msgspec.json.encode(op) + b"\n"
            for f in self.followers:
                try:
                    f.proc.stdin.write(lines)
                    f.proc.stdin.flush()
                except (BrokenPipeError, OSError, ValueError):
                    raise self.fail(f"rank {f.rank} stopped reading its operations") from None

    # ------------------------------------------------------------ faults

    def check(self) -> None:
        if self.failure is not None:
            raise self.error()

    def error(self) -> RingFailed:
        """The error a request of the failed group ends with."""
        return RingFailed(errors.GENERATION_FAILED, f"the distributed group failed: {self.failure}",
                          {"ranks": self.size})

    def fail(self, why: str) -> RingFailed:
        """Mark the ring failed and kill every follower (a collective waiting
        on one then fails at once on rank 0). Returns the error to raise."""
        if self.failure is None:
            self.failure = why
            self._failed_at = time.monotonic()
            log.error("distributed group failed: %s", why)
            self._kill()
        return self.error()

    def lost(self, exc: BaseException, wait_s: float = 1.0) -> RingFailed:
        """Rank 0's collective failed: name the rank behind it (one that
        exited or closed its pipe, when it shows within ``wait_s``)."""
        deadline = time.monotonic() + wait_s
        while self.failure is None and time.monotonic() < deadline:
            for f in self.followers:
                if f.proc.poll() is not None:
                    return self.fail(self._exit_reason(f))
            time.sleep(0.02)
        return self.fail(f"rank 0: {exc}")

    def _exit_reason(self, f: Follower) -> str:
        code = f.proc.poll()
        if code is None:
            return f"rank {f.rank} closed its control pipe"
        if code < 0:
            return f"rank {f.rank} was killed by signal {-code}"
        return f"rank {f.rank} exited with code {code}"

    def _watch(self) -> None:
        last = time.monotonic()
        calm = 0  # rounds since this thread last woke late
        while not self._closing:
            time.sleep(HEARTBEAT_S / 2)
            now = time.monotonic()
            if self.failure is not None:
                since = self.forward_since
                if since is not None and now - max(since, self._failed_at) >= STUCK_S:
                    mlx_stuck.declare(f"the distributed group failed: {self.failure}; rank 0's forward pass never "
                                      "returned from MLX's ring backend")
                    return
                continue
            # Woken late: this process was starved (a library call holding the
            # GIL), so the reader threads were too, and heartbeats may be
            # waiting unread. Judge staleness only after they had a turn.
            calm = 0 if now - last > HEARTBEAT_S else calm + 1
            last = now
            for f in self.followers:
                if self._closing or self.failure is not None:
                    break
                if f.proc.poll() is not None:
                    self.fail(self._exit_reason(f))
                    continue
                # Heartbeats come from a thread of their own, loading or not:
                # once the group is up, timeout_s holds (a load included).
                limit = self.timeout_s if self.group is not None else max(self.timeout_s, INIT_TIMEOUT_S)
                if now - f.last_seen > limit and calm >= 2 and not _unread(f.proc.stdout):
                    self.fail(f"rank {f.rank} sent no heartbeat for {limit:g} s (hung)")

    def _kill(self) -> None:
        for f in self.followers:
            if f.proc.poll() is None:
                try:
                    f.proc.kill()
                except OSError:
                    pass
        for f in self.followers:
            try:
                f.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        """Stop every follower (shutdown): EOF on their stdin, then a kill."""
        self._closing = True
        for f in self.followers:
            try:
                f.proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + 1.0
        for f in self.followers:
            try:
                f.proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                f.proc.send_signal(signal.SIGKILL)
        try:
            os.unlink(self.hostfile)
        except (OSError, AttributeError):
            pass

    def describe(self) -> dict:
        return {"backend": self.backend, "ranks": self.size,
                "pids": [os.getpid()] + [f.proc.pid for f in self.followers],
                "failure": self.failure}


_ring: Optional[Ring] = None


def current() -> Optional[Ring]:
    return _ring


def ensure(size: int, hosts: list[str], backend: str, timeout_s: float) -> Ring:
    """This worker's ring, started on first use."""
    global _ring
    if _ring is not None:
        if _ring.failure is not None:
            raise WorkerError(errors.LOAD_FAILED,
                              f"this worker's distributed group failed earlier ({_ring.failure}); MLX can't set "
                              "up a second group in one process: restart the worker to load distributed models",
                              {"field": "params.parallel"})
        if _ring.size != size or (hosts and hosts != _ring.hosts) or backend != _ring.backend:
            raise errors.invalid_params(
                "params.parallel", f"this worker's group has {_ring.size} ranks over {_ring.backend}"
                f"{' on ' + ', '.join(_ring.hosts) if _ring.hosts else ''}; MLX has one group per process, "
                "so every distributed model uses it")
        return _ring
    ring = Ring(size, hosts, backend, timeout_s)
    _ring = ring
    try:
        ring.start()
    except BaseException as exc:  # e.g. a follower's command could not be run
        if ring.failure is None:
            ring.fail(f"the ranks could not be started: {type(exc).__name__}: {exc}")  # kills those started
        if not ring.init_started:  # MLX's group was never set up: a later load starts afresh
            _ring = None
        raise
    return ring


def close() -> None:
    if _ring is not None:
        _ring.close()


def capabilities() -> protocol.DistributedCapabilities:
    """What ``load {parallel}`` can start, and this worker's group once one exists (``status``)."""
    ring = current()
    return protocol.DistributedCapabilities(
        backends=list(BACKENDS),
        ranks=ring.size if ring is not None else None,
        failure=ring.failure if ring is not None else None,
    )

"""The peers we compare against: mlx_lm.server over HTTP on loopback, and
mlx-lm in-process. Shared by the benchmarks."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time

from common import ROOT, worker_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlxLmServer:
    """``python -m mlx_lm.server`` on 127.0.0.1 with the same model and BLAS."""

    def __init__(self, path: str, blas: str | None, prefill_step: int = 512, extra: tuple[str, ...] = ()):
        self.port = free_port()
        env = worker_env()
        if blas:
            env["LD_PRELOAD"] = blas  # the same BLAS the worker binds
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm.server", "--model", path, "--host", "127.0.0.1",
             "--port", str(self.port), "--prefill-step-size", str(prefill_step), "--log-level", "WARNING", *extra],
            env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("mlx_lm.server exited")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/v1/models")
                conn.getresponse().read()
                return
            except OSError:
                time.sleep(0.3)
        self.close()
        raise RuntimeError("mlx_lm.server did not start")

    def stream(self, route: str, body: dict) -> tuple[float, float, float, int]:
        """POST a streaming request; return (start, first chunk, last chunk, chunks)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        start = time.perf_counter()
        conn.request("POST", route, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        first = last = None
        chunks = 0
        while True:
            line = response.fp.readline()
            if not line:
                break
            if line.startswith(b"data:") and not line.startswith(b"data: [DONE]"):
                last = time.perf_counter()
                first = first or last
                chunks += 1
        conn.close()
        if first is None:
            raise RuntimeError("mlx_lm.server streamed no data chunk")
        return start, first, last, chunks

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

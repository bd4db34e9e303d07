"""Shared fixtures: real worker subprocesses over real pipes, real MLX models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.build import ensure_model  # noqa: E402
from mlx_worker import protocol  # noqa: E402
from mlx_worker.client import WorkerClient  # noqa: E402


def worker_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env.update(extra)
    return env


def logprob_entries(events) -> list:
    """A request's logprob entries in order, from its token events. A last,
    text-only event (``tokens: []``, releasing held text: protocol/README.md
    § Text) carries none."""
    return [lp for e in events if isinstance(e, protocol.TokenEvent) for lp in (e.logprobs or [])]


def cancel_after(stream, n: int, channel: str | None = None):
    """Read a generate's events, cancel it at its n-th token event (of
    ``channel`` when given) and return its final result."""
    seen = 0
    for event in stream:
        if isinstance(event, protocol.TokenEvent) and channel in (None, event.channel):
            seen += 1
            if seen == n:
                assert stream.cancel() is True
    return stream.result


def spawn(*args: str, **kwargs) -> WorkerClient:
    kwargs.setdefault("env", worker_env())
    kwargs.setdefault("cwd", str(ROOT))
    kwargs.setdefault("trace", True)  # tests read the raw lines
    return WorkerClient(args, **kwargs)


@pytest.fixture(scope="session")
def tiny_model() -> str:
    return str(ensure_model("tiny-llama"))


@pytest.fixture(scope="session")
def small_model() -> str:
    return str(ensure_model("small-llama"))


@pytest.fixture(scope="module")
def worker(tiny_model):
    """One worker per test module with tiny-llama loaded (as model_id tiny)."""
    w = spawn()
    w.load(tiny_model, model_id="tiny")
    yield w
    w.close()


@pytest.fixture
def fresh_worker():
    """A worker of its own, for tests that change or end its state."""
    w = spawn()
    yield w
    w.close()

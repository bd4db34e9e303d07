"""Shared helpers for the benchmarks: fixtures, worker spawning, medians."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.build import ensure_model  # noqa: E402


def worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_VERBOSITY"] = "error"
    return env


def spawn(*args: str):
    from mlx_worker.client import WorkerClient

    return WorkerClient(args, env=worker_env(), cwd=str(ROOT))


def median(xs):
    return statistics.median(xs)


def bind_blas_like_the_worker() -> str | None:
    """Give in-process baselines the same BLAS the worker binds (fair A/B)."""
    from mlx_worker import blas

    return blas.bind(None)

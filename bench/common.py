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


def model_path(name_or_dir: str) -> Path:
    """A fixture by name (built if missing or stale), or a model folder as
    given (bench/device/issue22.py draws its own 1B models)."""
    path = Path(name_or_dir)
    return path.resolve() if path.is_dir() else ensure_model(name_or_dir)


def median(xs):
    return statistics.median(xs)


def bind_blas_like_the_worker() -> str | None:
    """Give in-process baselines the same BLAS the worker binds (fair A/B)."""
    from mlx_worker import blas

    return blas.bind(None)


RESULTS = ROOT / "bench" / "results"


def report(name: str, figures: dict) -> None:
    """Write a benchmark's headline figures to bench/results/<name>.json
    (bench/run_all.py gathers them into one table and chart)."""
    import json

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")

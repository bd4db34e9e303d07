"""Start-up: transformers' import table kept on disk (mlx_worker/import_cache.py),
through real workers: written on the first start, used after, never wrong
(a damaged file or the cache turned off gives the same tokens), and cheaper:
the worker's CPU time to its first token drops (Linux /proc; CPU time, not
wall time, because the machine may be shared)."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT, spawn, worker_env
from mlx_worker import protocol

sys.path.insert(0, str(ROOT / "bench"))
from startup import cpu_seconds  # noqa: E402  (the benchmark's own measure)


def first_token(model: str, **env) -> tuple[list[int], float]:
    w = spawn(env=worker_env(**env))
    try:
        w.load(model)
        tokens, cpu = [], float("nan")
        for event in w.generate(prompt="Hello", max_tokens=1, temperature=0):
            if isinstance(event, protocol.TokenEvent):
                tokens = event.tokens
                cpu = cpu_seconds(w.proc.pid)
        return tokens, cpu
    finally:
        w.close()


def tables(folder) -> list:
    return sorted(folder.glob("transformers-imports-*.pickle"))


def test_import_table_is_kept_used_and_never_wrong(tiny_model, tmp_path):
    cache = tmp_path / "cache"
    tokens, _ = first_token(tiny_model, MLX_WORKER_CACHE_DIR=str(cache))
    written = tables(cache)
    assert written, "the first start keeps transformers' import table"
    stamps = {p: p.stat().st_mtime_ns for p in written}
    again, _ = first_token(tiny_model, MLX_WORKER_CACHE_DIR=str(cache))
    assert again == tokens
    assert {p: p.stat().st_mtime_ns for p in tables(cache)} == stamps  # read, not rebuilt
    for p in written:
        p.write_bytes(b"not a pickle")
    damaged, _ = first_token(tiny_model, MLX_WORKER_CACHE_DIR=str(cache))
    assert damaged == tokens
    assert all(p.read_bytes() != b"not a pickle" for p in tables(cache))  # rebuilt
    off = tmp_path / "off"
    plain, _ = first_token(tiny_model, MLX_WORKER_CACHE_DIR=str(off), MLX_WORKER_IMPORT_CACHE="off")
    assert plain == tokens and not off.exists()
    unwritable = tmp_path / "file"
    unwritable.write_text("a file, not a folder")
    assert first_token(tiny_model, MLX_WORKER_CACHE_DIR=str(unwritable))[0] == tokens


@pytest.mark.heavy
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cached_import_table_cuts_cpu_to_first_token(tiny_model, tmp_path):
    env = {"MLX_WORKER_CACHE_DIR": str(tmp_path)}
    first_token(tiny_model, **env)  # writes the table
    cached = sorted(first_token(tiny_model, **env)[1] for _ in range(3))[1]
    uncached = sorted(first_token(tiny_model, **env, MLX_WORKER_IMPORT_CACHE="off")[1] for _ in range(3))[1]
    assert cached < 0.85 * uncached, (cached, uncached)

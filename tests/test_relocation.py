"""The worker as the application layer of a layered runtime (runtime/venvstacks.toml) still
starts and generates after the layers' folder is moved, as a host app's unpacked copy is.

The layout is venvstacks': an application venv holding the ``mlx_worker`` package as a plain
copy (its launch module, not an editable or repository install) and a relative ``.pth`` to
the framework layer's site-packages. The framework layer here is a folder of links to this
interpreter's site-packages (no 1 GB copy) without mlx_worker; the runtime (this Python)
stays in place, which python-build-standalone makes relocatable in a real build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import ROOT, spawn
from mlx_worker.client import WorkerClient

PY_DIR = f"python{sys.version_info.major}.{sys.version_info.minor}"


def _site_packages(layer: Path) -> Path:
    return layer / "lib" / PY_DIR / "site-packages"


def _framework_layer(layer: Path) -> None:
    """The MLX framework layer: every distribution this interpreter has, but the worker."""
    site = _site_packages(layer)
    site.mkdir(parents=True)
    for source in {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}:
        for entry in source.iterdir():
            name = entry.name.lower()
            if name.startswith(("mlx_worker", "__editable__", "__pycache__")) or name.endswith(".pth"):
                continue
            if not (site / entry.name).exists():
                (site / entry.name).symlink_to(entry)


def _application_layer(layer: Path, framework: Path) -> Path:
    """The worker's layer: a venv on the runtime, the package copied in, the framework linked
    by a path relative to this layer's own site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(layer)], check=True, timeout=120)
    site = _site_packages(layer)
    shutil.copytree(ROOT / "mlx_worker", site / "mlx_worker", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "_mlx_worker_framework.pth").write_text(os.path.relpath(_site_packages(framework), site) + "\n")
    return layer / "bin" / "python"


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return env


def test_application_layer_runs_after_its_folder_moves(tmp_path, tiny_model):
    built = tmp_path / "unpacked"
    _framework_layer(built / "framework-mlx")
    _application_layer(built / "app-mlx-worker", built / "framework-mlx")

    moved = tmp_path / "elsewhere" / "Application Support" / "layers"
    moved.parent.mkdir(parents=True)
    built.rename(moved)
    assert not built.exists()
    python = moved / "app-mlx-worker" / "bin" / "python"
    workdir = tmp_path / "cwd"
    workdir.mkdir()

    where = subprocess.run(
        [str(python), "-c", "import mlx_worker, mlx.core, mlx_lm, sys; "
         "print(mlx_worker.__file__); print(mlx.core.__file__); print(sys.prefix)"],
        cwd=workdir, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    worker_file, mlx_file, prefix = where.stdout.split("\n")[:3]
    assert Path(worker_file).is_relative_to(_site_packages(moved / "app-mlx-worker"))
    assert Path(mlx_file).is_relative_to(_site_packages(moved / "framework-mlx"))
    assert Path(prefix) == moved / "app-mlx-worker"

    params = dict(prompt="relocated layers", max_tokens=8, temperature=0.0)
    with WorkerClient(python=str(python), env=_clean_env(), cwd=str(workdir)) as moved_worker:
        assert moved_worker.ready.worker_version == __import__("mlx_worker").__version__
        moved_worker.load(tiny_model)
        result = moved_worker.generate(**params).wait()
        blas = moved_worker.ready.capabilities.blas
    with spawn() as repo_worker:
        repo_worker.load(tiny_model)
        expected = repo_worker.generate(**params).wait()
        # The optimized BLAS is found in the framework layer as in a plain venv.
        assert (blas is None) == (repo_worker.ready.capabilities.blas is None)
    assert result.stop_reason == expected.stop_reason
    assert result.tokens == expected.tokens and len(result.tokens) > 0

"""A faster ``import transformers`` (it is on the way to the first token).

transformers builds its lazy-import table at every import by scanning its
model files; the worker keeps that table on disk, keyed by transformers'
version and its models folder's listing. Anything unexpected falls back to
transformers' own scan. Install before anything imports transformers.
Spec: protocol/README.md § Lifecycle.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("mlx_worker.import_cache")

_TARGET = "transformers.utils.import_utils"


def cache_dir() -> Path:
    """``MLX_WORKER_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlx_worker`` (``~/.cache/mlx_worker``)."""
    if os.environ.get("MLX_WORKER_CACHE_DIR"):
        return Path(os.environ["MLX_WORKER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx_worker"


def _key(module_path: str, prefix) -> str:
    """What the table depends on: transformers' version, the folder, and the
    name, size and mtime of each of its model folders' entries."""
    import hashlib

    h = hashlib.sha256()
    h.update(repr((sys.modules["transformers"].__dict__.get("__version__"), str(module_path), prefix)).encode())
    folder = str(module_path)
    if not os.path.isdir(folder):  # a package's __init__.py: its folder
        folder = os.path.dirname(folder)
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            st = entry.stat()
            h.update(f"{entry.name}:{st.st_mtime_ns}:{st.st_size}\n".encode())
    return h.hexdigest()[:32]


def _cached(original):
    import pickle

    def define_import_structure(module_path, prefix=None):
        try:
            path = cache_dir() / f"transformers-imports-{_key(module_path, prefix)}.pickle"
        except Exception:  # an unexpected layout: transformers' own way
            return original(module_path, prefix)
        try:
            with open(path, "rb") as f:
                return pickle.load(f)
        except FileNotFoundError:
            pass
        except Exception:
            log.debug("transformers' import table cache %s is unreadable; rebuilding", path)
        table = original(module_path, prefix)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                pickle.dump(table, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("could not keep transformers' import table: %s", exc)
        return table

    define_import_structure.__wrapped__ = original
    return define_import_structure


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        original = getattr(module, "define_import_structure", None)
        if callable(original):
            module.define_import_structure = _cached(original)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # once
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Serve transformers' import table from the cache (before it is imported)."""
    if "transformers" in sys.modules or os.environ.get("MLX_WORKER_IMPORT_CACHE") == "off":
        return
    sys.meta_path.insert(0, _Finder())

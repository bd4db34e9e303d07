"""Bind an optimized BLAS under mlx-cpu before mlx.core loads (Linux only).

The Linux mlx-cpu wheel resolves ``cblas_*`` against a reference BLAS; an
OpenBLAS loaded into the global symbol scope first (one ships in the
opencv-python wheel mlx-vlm depends on) serves MLX's matrix products instead,
with identical greedy tokens. Off with ``--blas off`` or ``MLX_WORKER_BLAS=off``;
a path selects a library. Spec: protocol/README.md § Worker flags.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from typing import Optional

CANDIDATE_GLOBS = (
    "opencv_python.libs/libopenblas*.so*",
    "opencv_python_headless.libs/libopenblas*.so*",
)
SYSTEM_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)


def find_openblas() -> Optional[str]:
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        for pattern in CANDIDATE_GLOBS:
            hits = sorted(glob.glob(os.path.join(entry, pattern)))
            if hits:
                return hits[0]
    for path in SYSTEM_CANDIDATES:
        if os.path.exists(path):
            return path
    return None


def bind(choice: Optional[str]) -> Optional[str]:
    """Load the chosen BLAS globally; return its path, or None if none is bound.

    Must run before ``import mlx.core``. Does nothing off Linux (Metal and
    Accelerate need no help) or once mlx.core is already imported.
    """
    choice = choice or os.environ.get("MLX_WORKER_BLAS", "auto")
    if choice == "off" or not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return None
    path = find_openblas() if choice == "auto" else choice
    if not path:
        return None
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        lib.cblas_sgemm  # noqa: B018 - must export the standard CBLAS symbols
    except (OSError, AttributeError):
        return None
    return path

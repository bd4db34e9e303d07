"""The registry's entry for ``load {parallel}``: load.py (which starts ranks)
is imported only when a load asks for them."""

from __future__ import annotations

from pathlib import Path

from .. import errors, protocol
from ..models.loader import Loaded, Loader
from ..models.loading import LoadProgress


def _claims(path: Path, config: dict, params: protocol.LoadParams) -> bool:
    return params.parallel is not None


def _check(path: Path, config: dict, params: protocol.LoadParams) -> None:
    parallel = params.parallel
    if (parallel.ranks is None) == (parallel.hosts is None):
        raise errors.invalid_params("params.parallel", "give either ranks (processes on this machine) or hosts")
    from .load import check

    check(path, params, config)


def _load(path: Path, config: dict, params: protocol.LoadParams, progress: LoadProgress) -> Loaded:
    from .load import load

    return load(path, config, params, progress)


LOADER = Loader(_load, claims=_claims, check=_check)

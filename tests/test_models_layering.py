"""Issue 21's import rules for the models side, read from the source (every
import statement, module level or inside a function): the registry knows no
model family, and LoadedModel sits at the bottom."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_worker"


def imports_of(relative: str) -> set[str]:
    """Absolute names of the mlx_worker modules a file imports."""
    path = PACKAGE / relative
    base = ["mlx_worker", *Path(relative).with_suffix("").parts[:-1]]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            parent = base[: len(base) - (node.level - 1)] if node.level else []
            target = ".".join(parent + ([node.module] if node.module else []))
            out.update(f"{target}.{a.name}" for a in node.names)
            out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {name for name in out if name.startswith("mlx_worker")}


def test_the_registry_imports_no_vision_distributed_speculative_or_tools_module():
    for name in imports_of("models/registry.py") | imports_of("models/loader.py"):
        assert not name.startswith(("mlx_worker.vision", "mlx_worker.distributed", "mlx_worker.tools",
                                    "mlx_worker.engine")), name
        assert name not in ("mlx_worker.embeddings", "mlx_worker.models.text", "mlx_worker.models.fixups"), name


def test_loaded_model_imports_no_loading_cache_or_checks_module():
    allowed = {"mlx_worker", "mlx_worker.protocol", "mlx_worker.models.config"}
    assert imports_of("models/loaded.py") <= allowed
    assert imports_of("models/config.py") == set()


def test_the_loaded_model_has_typed_fields_and_no_extra_bag():
    from mlx_worker.models.loaded import LoadedModel

    fields = LoadedModel.__dataclass_fields__
    assert "extra" not in fields
    assert {"parallel", "pooling", "dimensions"} <= set(fields)
    assert LoadedModel.__hash__ is object.__hash__  # memos above key on it by identity

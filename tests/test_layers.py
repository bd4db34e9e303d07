"""Issue 21's remaining layering rules, checked on the source alone (every
import statement, module level or inside a function, followed through the
package): the wire at the bottom, host-side code on the wire only, a cache
store that renders nothing, constraints that know no tool calls, text and
sampling below any model; and the size limits a newcomer can read by."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from test_engine_layers import MODULES, ROOT, _imports, reaches

MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 215  # "about 200": Scheduler and Request are at 211-214 today; this keeps them from growing


def _tops(name: str) -> set[str]:
    return {t.split(".")[0] for t in _imports(name)}


def test_the_wire_types_import_only_msgspec():
    assert _tops("mlx_worker.protocol") <= {"msgspec", "typing", "__future__"}


def test_host_side_code_imports_only_the_wire_types():
    assert reaches("mlx_worker.client") == {"mlx_worker", "mlx_worker.protocol"}
    assert reaches("mlx_worker.cli") == {"mlx_worker", "mlx_worker.protocol", "mlx_worker.client"}


def test_the_cache_store_matches_token_keys_and_renders_nothing():
    for name in [m for m in MODULES if m.startswith("mlx_worker.cache.")
                 and m.rsplit(".", 1)[1] in ("store", "entry", "lease", "matching", "layers", "budget")]:
        for module in reaches(name):
            assert module not in ("mlx_worker.prompt", "mlx_worker.system_prompt"), (name, module)
            assert not module.startswith(("mlx_worker.tools", "mlx_worker.vision", "mlx_worker.engine",
                                          "mlx_worker.models.registry")), (name, module)


def test_constraints_know_nothing_of_tool_calls():
    for name in [m for m in MODULES if m.startswith("mlx_worker.constraints")]:
        assert not any(m.startswith("mlx_worker.tools") for m in reaches(name)), name


def test_text_and_sampling_work_below_any_model():
    for name in ("mlx_worker.textstream", "mlx_worker.sampling", "mlx_worker.dry"):
        for module in reaches(name):
            assert not module.startswith(("mlx_worker.models", "mlx_worker.engine", "mlx_worker.cache",
                                          "mlx_worker.vision")), (name, module)


def test_no_function_over_60_lines_and_no_class_over_about_200():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            size = node.end_lineno - node.lineno + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > MAX_FUNCTION_LINES:
                long.append(f"{name}.{node.name}: {size} lines")
            elif isinstance(node, ast.ClassDef) and size > MAX_CLASS_LINES:
                long.append(f"{name}.{node.name}: {size} lines")
    assert not long


def test_module_docstrings_are_short():
    long = [name for name, path in MODULES.items()
            if (doc := ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))) and doc.count("\n") >= 8]
    assert not long


def test_the_readme_layout_table_lists_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(mlx_worker/[\w/]+\.py)`", table))
    files = {str(p.relative_to(ROOT)) for p in MODULES.values()}
    assert files - listed == set()
    assert listed - files == set()

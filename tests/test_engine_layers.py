"""The engine's layering rules (issue 21), checked on the imports themselves:
every import statement of a module, at module level or inside a function,
followed through the package (what a module reaches, not only what it names)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "mlx_worker"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    path = MODULES[name]
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def reaches(name: str) -> set[str]:
    """Every module of the package ``name`` imports, directly or not."""
    seen, todo = set(), [name]
    while todo:
        for target in _imports(todo.pop()):
            if target in MODULES and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_a_request_knows_nothing_of_how_it_is_decoded_or_when_it_runs():
    for name in ("request", "plan", "decoder", "result", "sampler"):
        reached = reaches(f"mlx_worker.engine.{name}")
        for other in ("batch", "speculative", "draft_rounds", "scheduler", "runner", "admission", "preemption"):
            assert f"mlx_worker.engine.{other}" not in reached, (name, other)


def test_the_runner_never_admits_evicts_or_schedules():
    reached = reaches("mlx_worker.engine.runner")
    for other in ("admission", "preemption", "scheduler", "prefill_turns", "chunking"):
        assert f"mlx_worker.engine.{other}" not in reached, other


def test_the_scheduler_answers_through_a_callback_not_the_job_table():
    for name in [m for m in MODULES if m.startswith("mlx_worker.engine.")]:
        assert "mlx_worker.jobs" not in reaches(name), name
        assert "mlx_worker.methods" not in reaches(name), name


def test_the_job_table_and_a_cancelled_result_import_no_mlx():
    # a queued generate is answered (cancelled) before the compute thread imports MLX
    for name in ("mlx_worker.jobs", "mlx_worker.engine.result"):
        for module in reaches(name) | {name}:
            tops = {t.split(".")[0] for t in _imports(module)}
            assert not tops & {"mlx", "mlx_lm", "mlx_vlm"}, (name, module)

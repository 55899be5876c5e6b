"""The direction of imports is the architecture: pipeline -> stages -> narvl_model. Stages are plain functions that
the pipeline wraps in Ray from outside, so no module under stages/ imports ray; narvl_model imports none of Ray,
MLflow or DeepSpeed. Checked on the source (every import statement, at module level or inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every absolute import in a file (`import ray.train` and `from ray import x` -> ray)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def importers(package_dir: str, banned: set[str]) -> dict[str, set[str]]:
    """{file relative to the repo: the banned packages it imports} over every .py under `package_dir`."""
    out = {}
    for path in sorted((REPO / package_dir).rglob("*.py")):
        hit = imported_packages(path) & banned
        if hit:
            out[path.relative_to(REPO).as_posix()] = hit
    return out


def test_the_scan_sees_imports_at_any_depth(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    import ray.train\n    from mlflow.tracking import X\n"
                   "    from . import sibling\n")
    assert imported_packages(src) == {"os", "ray", "mlflow"}


def test_no_stage_module_imports_ray_or_mlflow():
    assert importers("stages", {"ray", "mlflow"}) == {}


def test_stages_do_not_import_the_pipeline():
    assert importers("stages", {"pipeline"}) == {}


def test_the_model_library_imports_no_orchestration():
    assert importers("narvl_model", {"ray", "mlflow", "deepspeed", "pipeline", "stages"}) == {}

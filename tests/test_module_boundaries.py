"""The package's structure as the README's Design section states it, read from the source (all imports,
function-level ones included): no import circle, MLflow only behind `tracking`, private library names only in
the two internals modules, the training loop free of Optuna, MLflow and the teacher module."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "autokd"
MODULES = {path.stem: path for path in PACKAGE.glob("*.py") if path.stem != "__init__"}


def _imports(name: str) -> list[str]:
    """Every module name imported anywhere in autokd/<name>.py (``from a.b import c`` gives a.b and a.b.c)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def _autokd_deps(name: str) -> set[str]:
    return {dep.split(".")[1] for dep in _imports(name)
            if dep.startswith("autokd.") and dep.split(".")[1] in MODULES} - {name}


def test_no_import_circle_between_autokd_modules() -> None:
    graph = {name: _autokd_deps(name) for name in MODULES}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            assert state.get(dep) != "open", "import circle: " + " -> ".join([*path, name, dep])
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_private_library_names_only_in_the_internals_modules() -> None:
    allowed = {"optuna_internals", "timm_internals"}
    for name in MODULES:
        private = [dep for dep in _imports(name) if dep.split(".")[0] in ("optuna", "mlflow", "torch", "timm")
                   and any(part.startswith("_") for part in dep.split(".")[1:])]
        assert name in allowed or not private, f"autokd/{name}.py imports private names: {private}"
        source = MODULES[name].read_text()
        if name not in allowed:
            for attr in ("._storage", "._trial_id", "._study_id", "._lock", "._file_path"):
                assert f"study{attr}" not in source and f"trial{attr}" not in source, (name, attr)


def test_mlflow_only_behind_tracking() -> None:
    users = {name for name in MODULES if any(dep.split(".")[0] == "mlflow" for dep in _imports(name))}
    assert users <= {"_mlflow_tracking"}, users


def test_the_training_loop_imports_no_optuna_mlflow_or_teacher() -> None:
    deps = _imports("train")
    assert not [d for d in deps if d.split(".")[0] in ("optuna", "mlflow")], deps
    assert "teacher" not in _autokd_deps("train")

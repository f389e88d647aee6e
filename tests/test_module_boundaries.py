"""The package's structure as docs/design.md states it, read from the source (all imports, function-level ones
included, ``__init__`` modules too): packages in layers whose imports point one way (down), no import circle
between modules, MLflow only behind `tracking`, private library names only in `autokd._internals`, the training
loop free of Optuna, MLflow and the teacher module, and the torch-free parts importable without torch."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import repo_pythonpath

PACKAGE = Path(__file__).resolve().parents[1] / "autokd"

#: Top to bottom: a package may import only packages on a lower line (or itself). The root ``autokd``
#: (its ``__init__``, the public entry points) is on top: no module of the package imports it.
LAYERS: list[set[str]] = [
    {"__init__"},
    {"cli"},
    {"search"},
    {"export"},
    {"report"},
    {"latency"},
    {"study"},
    {"tracking"},
    {"select"},
    {"model"},
    {"config"},
    {"spaces"},
    {"utils", "_internals"},
    {"errors", "_version"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _package(module: str) -> str:
    """The first-level package (or top-level module) a module belongs to; ``__init__`` for ``autokd`` itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str) -> list[str]:
    """Every module name imported anywhere in ``module`` (``from a.b import c`` gives a.b and a.b.c)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [f"{node.module}.{alias.name}" for alias in node.names] or [node.module]
            if node.module != "autokd":  # `from autokd import x` imports autokd.x, not the root's entry points
                found.append(node.module)
    return found


def _autokd_deps(module: str) -> set[str]:
    deps = set()
    for dep in _imports(module):
        while dep not in MODULES and "." in dep:
            dep = dep.rsplit(".", 1)[0]
        if dep in MODULES and dep != module and dep.startswith("autokd"):
            deps.add(dep)
    return deps


def test_every_module_belongs_to_a_layer() -> None:
    layered = set().union(*LAYERS)
    assert {_package(m) for m in MODULES} <= layered, {_package(m) for m in MODULES} - layered


def test_packages_import_only_downwards() -> None:
    rank = {package: i for i, layer in enumerate(LAYERS) for package in layer}
    upward = [f"{module} -> {dep}" for module in MODULES for dep in _autokd_deps(module)
              if _package(dep) != _package(module) and rank[_package(dep)] <= rank[_package(module)]]
    assert not upward, "imports that point up or sideways between packages: " + "; ".join(sorted(upward))


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


def test_the_checks_see_function_level_imports_and_init_modules() -> None:
    # The root's lazy entry points and a function-level import are both arrows (a check that skipped either
    # would miss a hidden circle).
    assert "autokd.export.student" in _autokd_deps("autokd")
    assert "autokd.report.evaluation" in _autokd_deps("autokd.report.build")


def test_private_library_names_only_in_the_internals_package() -> None:
    for name in MODULES:
        allowed = _package(name) == "_internals"
        private = [dep for dep in _imports(name) if dep.split(".")[0] in ("optuna", "mlflow", "torch", "timm")
                   and any(part.startswith("_") for part in dep.split(".")[1:])]
        assert allowed or not private, f"{name} imports private names: {private}"
        source = MODULES[name].read_text()
        if not allowed:
            for attr in ("._storage", "._trial_id", "._study_id", "._lock", "._file_path"):
                assert f"study{attr}" not in source and f"trial{attr}" not in source, (name, attr)


def test_mlflow_only_behind_tracking() -> None:
    users = {name for name in MODULES if any(dep.split(".")[0] == "mlflow" for dep in _imports(name))}
    assert users <= {"autokd.tracking._mlflow"}, users


def test_the_training_loop_imports_no_optuna_mlflow_or_teacher() -> None:
    deps = _imports("autokd.model.train")
    assert not [d for d in deps if d.split(".")[0] in ("optuna", "mlflow")], deps
    assert "autokd.model.teacher" not in _autokd_deps("autokd.model.train")


def test_the_model_package_knows_nothing_of_optuna_or_mlflow() -> None:
    for name in MODULES:
        if _package(name) == "model":
            deps = [d for d in _imports(name) if d.split(".")[0] in ("optuna", "mlflow")]
            assert not deps, (name, deps)


def test_select_does_no_io_and_imports_no_torch() -> None:
    for name in MODULES:
        if _package(name) == "select":
            deps = [d for d in _imports(name) if d.split(".")[0] in ("torch", "optuna", "mlflow", "os", "pathlib")]
            assert not deps, (name, deps)


def test_config_and_the_latency_server_import_no_torch() -> None:
    # autokd.export.layout too: `autokd export` checks --out with it before torch is imported.
    code = ("import sys, autokd.config, autokd.latency.remote.server, autokd.latency.protocol, autokd.export.layout; "
            "bad = [m for m in ('torch', 'timm') if m in sys.modules]; print(*bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=repo_pythonpath()))
    assert proc.returncode == 0, proc.stdout + proc.stderr

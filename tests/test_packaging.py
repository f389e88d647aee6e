"""The package as a user installs it: a wheel with its built-in search spaces, `--space NAME`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from autokd.cli import main
from autokd.errors import UserError
from autokd.model.space import load_space
from autokd.spaces import builtin_spaces, resolve_space


def test_builtin_spaces_are_the_documented_examples() -> None:
    spaces = builtin_spaces()
    assert {"default", "cifar_gpu"} <= set(spaces)
    # One set of files: the repository's search_spaces/ is the package's folder, not a copy that can drift.
    examples = REPO_ROOT / "search_spaces"
    assert examples.resolve() == (REPO_ROOT / "autokd" / "spaces").resolve()
    assert {p.stem for p in examples.glob("*.yaml")} == set(spaces)
    for name, path in spaces.items():
        assert load_space(path).students, name


def test_space_accepts_a_name_or_a_file(tmp_path: Path) -> None:
    assert resolve_space(None) == builtin_spaces()["default"]
    assert resolve_space("cifar_gpu") == builtin_spaces()["cifar_gpu"]
    own = tmp_path / "mine.yaml"
    own.write_text("students: {families: [resnet]}\nlosses: {ce: {}}\n")
    assert resolve_space(str(own)) == own
    with pytest.raises(UserError, match=r"--space 'defualt'.*did you mean 'default'.*cifar_gpu, default, fashion"):
        resolve_space("defualt")


def test_cli_unknown_space_name_exits_2_listing_builtins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "studies"
    assert main(["--root", str(root), "search", "--space", "cifar_gp", "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "'cifar_gp'" in err and "did you mean 'cifar_gpu'" in err and "default" in err
    assert not root.exists()


@pytest.mark.slow
def test_wheel_installs_and_searches_from_an_empty_directory(tmp_path: Path, tiny_teacher: tuple[str, Path]) -> None:
    """Build the wheel, install it into a target folder (no source tree on the path), search from an empty dir."""
    src = tmp_path / "src"  # build from a copy: pip builds in place and would leave build/ in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    shutil.copytree(REPO_ROOT / "autokd", src / "autokd", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(wheels), str(src)], check=True, cwd=tmp_path, timeout=300)
    (wheel,) = wheels.glob("autokd-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, cwd=tmp_path, timeout=300)
    shutil.rmtree(src)
    assert sorted(p.name for p in (site / "autokd" / "spaces").glob("*.yaml")) == ["cifar_gpu.yaml", "default.yaml",
                                                                                           "fashion.yaml"]

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    where = subprocess.run([sys.executable, "-c", "import autokd; print(autokd.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the installed wheel, not the checkout
    arch, ckpt = tiny_teacher
    proc = subprocess.run([str(site / "bin" / "autokd"), "search", "--budget", "2", "--no-mlflow", "--epochs", "1",
                           "--teacher", arch, "--teacher-checkpoint", str(ckpt), "--train-limit", "160",
                           "--device", "cpu", "--sampler", "random"],
                          cwd=empty, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "digits-default" in proc.stdout and "2/2 trials" in proc.stdout, proc.stdout[-3000:]
    assert sorted(p.name for p in empty.iterdir()) == ["studies"]

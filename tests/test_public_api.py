"""autokd's public entry points (``autokd/__init__.py``): one tiny search, its report, an export and the
student loaded back, all through ``import autokd`` alone; and ``import autokd`` stays light."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Logged, repo_pythonpath
from test_search import TINY_SPACE

import autokd

pytestmark = pytest.mark.slow


def test_import_autokd_loads_no_heavy_library() -> None:
    code = ("import sys, autokd; bad = [m for m in ('torch', 'timm', 'mlflow', 'optuna') if m in sys.modules]; "
            "print(*bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=repo_pythonpath()))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(autokd.__all__) == {"SearchSettings", "__version__", "build_report", "export_trial", "load_student",
                                   "run_search"}


def test_search_report_export_and_load_from_python(tmp_path: Path, tiny_teacher: tuple[str, Path],
                                                   logged: Logged) -> None:
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    arch, ckpt = tiny_teacher
    root = tmp_path / "studies"
    settings = autokd.SearchSettings(budget=3, space=space, teacher=arch, teacher_checkpoint=str(ckpt),
                                     sampler="random", mlflow=False, train_limit=160, root=root, device="cpu")
    summary = autokd.run_search(settings, prune=False)
    assert summary.study_name == "digits-tiny" and summary.finished_in_study == 3
    # What the command prints, a notebook gets through logging (the `autokd` loggers), to show or silence.
    assert any(m.startswith("study 'digits-tiny' (new) — files under ") for m in logged())

    report = autokd.build_report(summary.study_name, root=root)
    assert report is not None and (root / "digits-tiny" / "report" / "report.html").is_file()

    result = autokd.export_trial(summary.study_name, pick="knee", out=tmp_path / "student", root=root,
                                 formats="safetensors,onnx")
    assert (tmp_path / "student" / "model.onnx").is_file() and result.trial in {point.number for point in report.front}
    model = autokd.load_student(tmp_path / "student")
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    from autokd.errors import UserError

    with pytest.raises(UserError, match="budget"):
        autokd.run_search(settings, budget=0)

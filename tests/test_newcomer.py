"""A newcomer's first hour (issue 17): the report's zoomed view, resuming with another --epochs, commands that
fail on their input leave no files, named objectives, the commands printed at the end of a search."""
from __future__ import annotations

import math
import random
import re
import subprocess
from pathlib import Path

import optuna
import pytest
from browser import chromium
from test_search import TINY_SPACE, settings

from autokd.cli import main
from autokd.errors import UserError
from autokd.report.render import write_report, zoom_ranges
from autokd.search.run import run_search
from autokd.select.pareto import TrialPoint, front_points
from autokd.study.store import make_storage


def _default_like_points() -> list[TrialPoint]:
    """Like a default search: most students pruned at 10-50 %, the complete ones at 89-97 % in five families."""
    rng = random.Random(3)
    latency = {"resnet": 0.9, "mobilenetv3": 1.2, "regnet": 1.5, "convnext": 1.4, "vit": 2.5}
    points = []
    for n in range(50):
        family = rng.choice(sorted(latency))
        lat = latency[family] * rng.uniform(0.7, 2.0)
        params = {"family": family, "width": round(rng.uniform(0.25, 0.75), 2), "loss": rng.choice(["ce", "kd"]),
                  "lr": round(rng.uniform(0.002, 0.02), 4)}
        if rng.random() < 0.55:
            points.append(TrialPoint(n, "PRUNED", None, lat, params, last_val_acc=rng.uniform(0.08, 0.5)))
        else:
            acc = min(0.99, 0.93 + 0.03 * math.log(lat) + rng.uniform(-0.03, 0.01))
            points.append(TrialPoint(n, "COMPLETE", acc, lat, params, None))
    return points


def test_zoom_shows_the_front_not_the_pruned(tmp_path: Path) -> None:
    points = _default_like_points()
    front = front_points(points)
    (x_lo, x_hi), (y_lo, y_hi) = zoom_ranges(points, front)
    for p in front:  # every front member inside the zoomed view
        assert x_lo <= p.latency_ms <= x_hi and y_lo <= p.val_acc <= y_hi
    accs = [p.val_acc for p in front]
    assert y_hi - y_lo < 0.15 and y_lo > 0.5  # not the 0-100 % axis the pruned students force
    assert y_hi - y_lo >= max(accs) - min(accs)
    pruned = [p for p in points if p.state == "PRUNED"]
    assert all(p.last_val_acc < y_lo for p in pruned)
    assert zoom_ranges(points, []) is None

    write_report(points, tmp_path, title="zoom")
    text = (tmp_path / "report.html").read_text()
    assert text.index('id="pareto-zoom"') < text.index('id="pareto-plot"')  # the region that matters first
    for family in ("resnet", "mobilenetv3", "regnet", "convnext", "vit"):
        assert f"family: {family}" in text
    for key in ("family = ", "lr = ", "loss = ", "width = "):  # parameters in the hover text
        assert key in text


@pytest.mark.slow
def test_zoomed_report_renders_in_headless_browser(tmp_path: Path) -> None:
    browser = chromium()
    if browser is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    write_report(_default_like_points(), tmp_path / "r", title="zoom")
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--virtual-time-budget=5000"]
    url = (tmp_path / "r" / "report.html").resolve().as_uri()
    dom = subprocess.run([*common, f"--user-data-dir={tmp_path / 'p'}", "--dump-dom", url], capture_output=True,
                         text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('class="main-svg"') >= 4  # two plots rendered (each has two svg layers)
    assert "the front and the students near it" in dom.stdout


@pytest.mark.slow
def test_resume_with_other_epochs_is_refused(tmp_path: Path, tiny_teacher: tuple[str, Path]) -> None:
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    run_search(settings(tmp_path, tiny_teacher, space, budget=1, epochs=2))
    journal = tmp_path / "studies" / "optuna.journal"
    before = journal.read_bytes()
    with pytest.raises(UserError, match=r"created with 2 epochs per trial, this run asks for 3.*--epochs 2"):
        run_search(settings(tmp_path, tiny_teacher, space, budget=2, epochs=3))
    assert journal.read_bytes() == before  # the study is unchanged
    # Without --epochs the space's 4 epochs are asked for: refused too; the same 2 resume.
    with pytest.raises(UserError, match="created with 2 epochs"):
        run_search(settings(tmp_path, tiny_teacher, space, budget=2))
    run_search(settings(tmp_path, tiny_teacher, space, budget=2, epochs=2))
    study = optuna.load_study(study_name="digits-tiny", storage=make_storage(None, tmp_path / "studies"))
    assert len(study.trials) == 2 and study.user_attrs["epochs"] == 2
    assert study.metric_names == ["val_acc", "latency_ms"]  # named for optuna-dashboard and every Optuna tool


@pytest.mark.slow
def test_cli_resume_with_other_epochs_exits_2(tmp_path: Path, tiny_teacher: tuple[str, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    arch, ckpt = tiny_teacher
    root = tmp_path / "studies"
    argv = ["--root", str(root), "search", "--space", str(space), "--teacher", arch, "--teacher-checkpoint",
            str(ckpt), "--train-limit", "160", "--device", "cpu", "--no-mlflow", "--sampler", "random", "--budget", "1"]
    assert main([*argv, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    # The next three commands: the report, the export of the knee student (no `autokd ui`: --no-mlflow).
    assert f"open {root / 'digits-tiny' / 'report' / 'report.html'}" in out
    assert f"autokd --root {root} export --study digits-tiny --pick knee --out student/" in out
    before = (root / "optuna.journal").read_bytes()
    assert main([*argv, "--budget", "2", "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "1 epochs per trial" in err and "--epochs 1" in err
    assert (root / "optuna.journal").read_bytes() == before


@pytest.mark.parametrize("command", [["report", "--study", "nosuch"],
                                     ["export", "--study", "nosuch", "--pick", "knee", "--out", "student"],
                                     ["sync-mlflow", "--study", "nosuch"]])
def test_failing_commands_create_no_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    assert "nosuch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no studies/optuna.journal, no student/


def test_next_steps_name_the_ui_with_mlflow() -> None:
    import argparse

    from autokd.cli import _next_steps
    from autokd.search.run import SearchSummary

    args = argparse.Namespace(root=None, storage=None, no_mlflow=False, tracking_uri=None)
    text = _next_steps(args, SearchSummary(study_name="digits-default", study_dir=Path("studies/digits-default")))
    lines = text.splitlines()
    assert lines[0] == "next:" and len(lines) == 4
    assert re.search(r"autokd report --study digits-default", lines[1])  # no report file yet: how to make it
    assert lines[2].strip() == "autokd ui --study digits-default"
    assert lines[3].strip() == "autokd export --study digits-default --pick knee --out student/"

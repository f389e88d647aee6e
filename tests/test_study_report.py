"""autokd.study_report: from a stored study to report points, and the study a read-only command opens."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from conftest import Logged

from autokd.errors import UserError
from autokd.report.build import build_report, report_command, resolve_study, study_data, trial_points
from autokd.study.store import make_storage

DIRECTIONS = ["maximize", "minimize"]


def _study(root: Path, name: str = "digits-default") -> optuna.Study:
    return optuna.create_study(study_name=name, storage=make_storage(None, root), directions=DIRECTIONS)


def _trial(study: optuna.Study, state: str, val_acc: float | None = None, latency_ms: float = 1.0) -> int:
    trial = study.ask()
    trial.set_user_attr("params", {"family": "resnet", "width": 0.5, "kd.alpha": 0.3})
    trial.set_user_attr("latency", {"median_ms": latency_ms, "low_ms": latency_ms * 0.98,
                                    "high_ms": latency_ms * 1.02, "params": 1234})
    trial.set_user_attr("curve", [0.5, 0.7])
    if state == "COMPLETE":
        study.tell(trial, [val_acc, latency_ms])
    elif state == "INFEASIBLE":
        trial.set_user_attr("autokd_state", "INFEASIBLE")
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    elif state == "PRUNED":
        trial.set_user_attr("autokd_state", "PRUNED")
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    elif state == "FAIL":
        trial.set_user_attr("fail_reason", "oom")
        trial.set_user_attr("autokd_state", "FAIL")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return trial.number


def test_trial_points_carry_each_state_params_latency_and_intervals(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.set_user_attr("val_images", 200)
    numbers = {state: _trial(study, state, val_acc=0.9) for state in ("COMPLETE", "PRUNED", "INFEASIBLE", "FAIL")}
    study.ask()  # RUNNING
    study.enqueue_trial({"x": 1})  # WAITING: not a point
    points = {p.number: p for p in trial_points(study)}
    assert sorted(points) == [0, 1, 2, 3, 4]
    assert {state: points[n].state for state, n in numbers.items()} == {
        "COMPLETE": "COMPLETE", "PRUNED": "PRUNED", "INFEASIBLE": "INFEASIBLE", "FAIL": "FAIL"}
    assert points[4].state == "RUNNING"
    done = points[numbers["COMPLETE"]]
    assert done.val_acc == 0.9 and done.latency_ms == 1.0 and done.latency_ci == (0.98, 1.02)
    assert done.params == {"family": "resnet", "width": 0.5, "kd.alpha": 0.3}
    assert done.acc_ci is not None and done.acc_ci[0] < 0.9 < done.acc_ci[1]  # Wilson on 200 images
    assert done.param_count == 1234 and done.epochs == 2 and done.last_val_acc == 0.7
    assert points[numbers["PRUNED"]].val_acc is None  # only complete trials have an accuracy
    assert points[numbers["FAIL"]].reason == "oom"


def test_resolve_study_picks_the_only_or_most_recent_and_names_typos(tmp_path: Path, logged: Logged) -> None:
    _trial(_study(tmp_path, "digits-default"), "COMPLETE", val_acc=0.9)
    assert resolve_study(None, None, tmp_path).study_name == "digits-default"
    _trial(_study(tmp_path, "cifar10-default"), "COMPLETE", val_acc=0.5)  # the most recently started trial
    assert resolve_study(None, None, tmp_path).study_name == "cifar10-default"
    assert "others: digits-default" in logged()[-1]
    with pytest.raises(UserError, match=r"--study 'digits-defualt': no such study .*did you mean 'digits-default'"):
        resolve_study("digits-defualt", None, tmp_path)


def test_resolve_study_on_an_empty_root_creates_no_storage_file(tmp_path: Path) -> None:
    root = tmp_path / "studies"
    with pytest.raises(UserError, match="no study in .*run `autokd search` first"):
        resolve_study(None, None, root)
    with pytest.raises(UserError, match="studies there: none"):
        resolve_study("x", None, root)
    assert not root.exists()


def test_study_data_refuses_a_dataset_that_changed(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.set_user_attr("dataset", "digits")
    study.set_user_attr("train_limit", 60)
    data = study_data(study)
    assert len(data.y_train) <= 60
    study.set_user_attr("data_fingerprint", "0123456789ab")
    with pytest.raises(UserError, match="differs from the one the study was run on"):
        study_data(study)


def test_no_report_without_a_completed_trial(tmp_path: Path, logged: Logged) -> None:
    study = _study(tmp_path)
    _trial(study, "PRUNED")
    assert build_report(study, tmp_path) is None
    assert logged() == ["study 'digits-default': no completed trial yet, no report"]
    assert not (tmp_path / "digits-default" / "report").exists()


def test_report_command_refuses_a_bad_tolerance_before_opening_anything(tmp_path: Path) -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(UserError, match="--tolerance .*must be a number >= 0"):
            report_command(None, None, tmp_path / "studies", None, bad, None, None)
    assert not (tmp_path / "studies").exists()

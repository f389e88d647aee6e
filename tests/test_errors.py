"""Which error where (autokd.errors): the pure layers raise ValueError/TypeError, and the boundary that read the
user's input turns them into a UserError with the same message, so that `autokd ...` still exits 2 with it."""
from __future__ import annotations

import ast
from pathlib import Path

import optuna
import pytest

from autokd.cli import main
from autokd.errors import UserError, as_user_error
from autokd.study.store import make_storage

PACKAGE = Path(__file__).resolve().parents[1] / "autokd"

#: Modules that never read user input: they know nothing of flags or exit codes.
PURE_MODULES = ["select/pareto.py", "select/pruning.py", "model/train.py", "model/losses.py", "model/students.py",
                "latency/protocol.py", "report/render.py"]


def test_as_user_error_keeps_the_message_and_the_cause() -> None:
    for exc in (ValueError("width 9 is out of range"), TypeError("width '1' must be a number")):
        with pytest.raises(UserError) as caught, as_user_error("space.yaml: students.width: "):
            raise exc
        assert str(caught.value) == f"space.yaml: students.width: {exc}" and caught.value.__cause__ is exc
    with pytest.raises(UserError, match=r"^width 9 is out of range$"), as_user_error():
        raise ValueError("width 9 is out of range")
    with pytest.raises(RuntimeError), as_user_error():  # anything else is not about the input: it stays as it is
        raise RuntimeError("a bug")


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_layers_never_raise_user_error(module: str) -> None:
    tree = ast.parse((PACKAGE / module).read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert "UserError" not in names, module


@pytest.mark.parametrize(("argv", "message"), [
    (["--loss", "dkdd"], "unknown loss 'dkdd'; valid losses: "),
    (["--loss", "kd", "--temperature", "0"], "loss 'kd': hyperparameter temperature=0.0 is out of range"),
    (["--family", "resnett"], "unknown student family 'resnett' (did you mean 'resnet'?)"),
    (["--width", "5"], "student width multiplier 5.0 is out of range"),
])
def test_distill_bad_student_or_loss_exits_2_with_the_pure_layer_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    out = tmp_path / "student"
    assert main(["--root", str(tmp_path / "studies"), "distill", "--device", "cpu", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autokd distill: error: ") and message in err, err
    assert not out.exists()


@pytest.fixture()
def one_trial_root(tmp_path: Path) -> Path:
    """A studies root holding one study with one COMPLETE trial (no dataset or checkpoint needed)."""
    root = tmp_path / "studies"
    study = optuna.create_study(study_name="s", storage=make_storage(None, root), directions=["maximize", "minimize"])
    trial = study.ask()
    trial.set_user_attr("params", {"family": "resnet", "width": 0.5})
    trial.set_user_attr("latency", {"median_ms": 1.0})
    study.tell(trial, [0.9, 1.0])
    return root


@pytest.mark.parametrize(("argv", "message"), [
    (["report", "--max-latency-ms", "inf"], "max latency must be a positive number of milliseconds, got inf"),
    (["report", "--hv-ref-ms", "inf"],
     "hypervolume reference must be two finite numbers (accuracy, latency_ms), got (0.0, inf)"),
    (["export", "--max-latency-ms", "inf", "--out", "OUT"],
     "max latency must be a positive number of milliseconds, got inf"),
])
def test_report_and_export_limits_exit_2_with_the_picks_message(
        one_trial_root: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    # argparse lets "inf" through as a positive number; the front's own checks refuse it.
    out = one_trial_root.parent / "student"
    assert main(["--root", str(one_trial_root), *[str(out) if a == "OUT" else a for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"autokd {argv[0]}: error: {message}"), err
    assert not (one_trial_root / "s" / "report").exists() and not out.exists()

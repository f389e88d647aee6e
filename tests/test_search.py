"""End-to-end tests of `autokd search` on a tiny real study (digits subset, tiny students, tiny teacher)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import optuna
import pytest

from autokd.cli import main
from autokd.config import SearchSettings
from autokd.errors import UserError
from autokd.report.build import trial_points
from autokd.search.objective import TrialOutcome
from autokd.search.processes import SETTINGS_ENV
from autokd.search.run import run_search
from autokd.search.worker_loop import SearchProgress
from autokd.study.store import budget_used, make_storage

pytestmark = pytest.mark.slow

# One fixed architecture: every trial has the same (cached) latency, so who is pruned depends only on the
# accuracy at each rung — deterministic on CPU — while the learning rate spreads accuracies far apart.
TINY_SPACE = """
name: tiny
epochs: 4
input_size: 16
students:
  width: 0.25
  depth: 0.25
  families: [resnet]
losses:
  ce: {}
  kd: {temperature: {low: 2.0, high: 4.0}, alpha: 0.7}
optimizer:
  name: adamw
  lr: {low: 0.00001, high: 0.03, log: true}
  weight_decay: 0.0001
batch_size: 32
pruning: {eta: 2, min_epoch: 1, min_peers: 2}
"""


def settings(tmp_path: Path, tiny_teacher: tuple[str, Path], space: Path, **overrides: object) -> SearchSettings:
    arch, ckpt = tiny_teacher
    base = dict(budget=8, space=space, dataset="digits", teacher=arch, teacher_checkpoint=str(ckpt),
                sampler="random", seed=3, mlflow=False, train_limit=160, root=tmp_path / "studies", device="cpu")
    base.update(overrides)
    return SearchSettings(**base)  # type: ignore[arg-type]


@pytest.fixture()
def space_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SPACE)
    return path


def load(tmp_path: Path, name: str = "digits-tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=make_storage(None, tmp_path / "studies"))


def test_search_budget_states_pruning_and_top_up(tmp_path: Path, tiny_teacher: tuple[str, Path],
                                                 space_file: Path) -> None:
    summary = run_search(settings(tmp_path, tiny_teacher, space_file))
    study = load(tmp_path)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 8 == summary.finished_in_study
    states = [p.state for p in trial_points(study)]
    assert states.count("COMPLETE") >= 2
    assert states.count("PRUNED") >= 1, states
    assert "FAIL" not in states
    # Pruned trials keep their learning curve, stop early, and never enter the front.
    front_numbers = {t.number for t in study.best_trials}
    for t in finished:
        if t.state == optuna.trial.TrialState.PRUNED:
            assert t.number not in front_numbers
            assert 1 <= len(t.user_attrs["curve"]) < 4
            assert "pruned_at_epoch" in t.user_attrs
        else:
            assert len(t.user_attrs["curve"]) == 4
            assert (tmp_path / "studies" / "digits-tiny" / "trials" / str(t.number) / "model.safetensors").is_file()
    # Latency measured once for the single architecture; every other trial is a cache hit.
    hits = [t.user_attrs["latency"]["cache_hit"] for t in sorted(finished, key=lambda t: t.number)]
    assert hits[0] is False and all(hits[1:])
    # It was timed beside its family's anchor, and the anchor panel held the space's one family only.
    first = min(finished, key=lambda t: t.number).user_attrs["latency"]
    assert first["anchor"].startswith("resnet-") and first["anchor"] != first["key"]
    cached = {p.stem for p in (tmp_path / "studies" / "latency_cache").glob("*/*.json")}
    assert cached == {first["key"], first["anchor"]}
    # The report was written at the end of the search.
    report = tmp_path / "studies" / "digits-tiny" / "report"
    assert (report / "report.html").is_file() and (report / "front.csv").is_file()

    # Rerunning with a larger budget tops the same study up; it does not start a new one.
    run_search(settings(tmp_path, tiny_teacher, space_file, budget=10))
    study = load(tmp_path)
    assert len([t for t in study.trials if t.state.is_finished()]) == 10
    assert len(optuna.get_all_study_summaries(make_storage(None, tmp_path / "studies"))) == 1
    # Same budget again: nothing to do.
    again = run_search(settings(tmp_path, tiny_teacher, space_file, budget=10))
    assert again.outcomes == []


def test_in_process_search_with_two_jobs_spawns_a_worker(tmp_path: Path, tiny_teacher: tuple[str, Path],
                                                        space_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run_search` with jobs=2 from Python does what `autokd search --jobs 2` does: it starts a second worker
    process with the same settings, and together they finish exactly the budget."""
    from conftest import repo_pythonpath

    monkeypatch.setenv("PYTHONPATH", repo_pythonpath())  # the spawned worker imports this checkout's autokd
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    storage = make_storage(None, tmp_path / "studies")
    progress: list[SearchProgress] = []

    def on_trial(outcome: TrialOutcome, where: SearchProgress) -> None:
        progress.append(where)
        # After its first trial this worker waits for the spawned one to claim a trial, so that both work
        # however long the spawned worker takes to start.
        deadline = time.monotonic() + 300
        while not {t.user_attrs.get("worker", {}).get("pid") for t in load(tmp_path).trials} - {os.getpid()}:
            assert time.monotonic() < deadline, "the spawned worker never claimed a trial"
            time.sleep(0.2)

    summary = run_search(settings(tmp_path, tiny_teacher, space_file, budget=4, jobs=2), on_trial=on_trial)
    study = optuna.load_study(study_name="digits-tiny", storage=storage)
    assert summary.finished_in_study == 4 == len(study.trials)
    assert all(t.state.is_finished() for t in study.trials) and budget_used(study) == 4
    pids = {t.user_attrs["worker"]["pid"] for t in study.trials}
    assert len(pids) == 2 and os.getpid() in pids
    assert {t.user_attrs["worker"]["threads"] for t in study.trials} == {1}
    assert len(progress) == len(summary.outcomes) >= 1 and progress[-1].budget == 4
    assert os.environ.get(SETTINGS_ENV) is None  # the settings went to the spawned worker only


def test_resume_with_changed_space_is_refused(tmp_path: Path, tiny_teacher: tuple[str, Path],
                                              space_file: Path) -> None:
    run_search(settings(tmp_path, tiny_teacher, space_file, budget=1))
    space_file.write_text(TINY_SPACE.replace("epochs: 4", "epochs: 5"))
    with pytest.raises(UserError, match="different search space"):
        run_search(settings(tmp_path, tiny_teacher, space_file, budget=2))
    assert len(load(tmp_path).trials) == 1


def test_max_latency_rejects_before_training(tmp_path: Path, tiny_teacher: tuple[str, Path],
                                             space_file: Path) -> None:
    run_search(settings(tmp_path, tiny_teacher, space_file, budget=2, max_latency_ms=1e-6))
    study = load(tmp_path)
    points = trial_points(study)
    assert [p.state for p in points] == ["INFEASIBLE", "INFEASIBLE"]
    for t in study.trials:
        assert "curve" not in t.user_attrs  # never trained
        assert "latency" in t.user_attrs
    assert not (tmp_path / "studies" / "digits-tiny" / "trials").exists()


def test_cli_bad_space_exits_2_before_any_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstudents: {families: [resnett]}\nlosses: {ce: {}}\n")
    code = main(["--root", str(tmp_path / "studies"), "search", "--space", str(bad), "--budget", "1", "--no-mlflow"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "resnett" in err and "did you mean 'resnet'" in err
    assert not (tmp_path / "studies" / "optuna.journal").exists()


def run_cli(argv: list[str]) -> int:
    """main() returns the exit code; argparse's own errors raise SystemExit(2)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--dataset", "digitz"], "digitz"),
        (["--budget", "0"], "--budget"),
        (["--teacher", "resnet_nope"], "resnet_nope"),
        (["--teacher-checkpoint", "/no/such/teacher.safetensors"], "/no/such/teacher.safetensors"),
        (["--device", "tpu"], "--device"),
        (["--sampler", "cmaes"], "cmaes"),
        (["--space", "/no/such/space.yaml"], "/no/such/space.yaml"),
        (["--latency-precision", "int9"], "--latency-precision 'int9': unknown precision (did you mean 'int8'?)"),
        (["--latency-precision", "int8", "--latency-runtime", "torch"], "needs --latency-runtime onnxruntime"),
    ],
)
def test_cli_bad_inputs_exit_2_before_any_study(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                argv: list[str], fragment: str) -> None:
    root = tmp_path / "studies"
    code = run_cli(["--root", str(root), "search", *argv, "--no-mlflow", "--train-limit", "60"])
    assert code == 2
    assert fragment in capsys.readouterr().err
    assert not (root / "optuna.journal").exists()


def test_distill_command_end_to_end(tmp_path: Path, tiny_teacher: tuple[str, Path]) -> None:
    arch, ckpt = tiny_teacher
    out = tmp_path / "student"
    code = main(["--root", str(tmp_path / "studies"), "distill", "--family", "resnet", "--width", "0.25", "--depth",
                 "0.25", "--loss", "kd", "--temperature", "4", "--alpha", "0.9", "--epochs", "2", "--teacher", arch,
                 "--teacher-checkpoint", str(ckpt), "--out", str(out), "--input-size", "16", "--device", "cpu"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["loss"] == "kd" and config["loss_params"] == {"temperature": 4.0, "alpha": 0.9}
    assert 0.0 <= config["test_acc"] <= 1.0 and config["val_acc"] > 0.2
    assert (out / "model.safetensors").stat().st_size > 0
    # The same command and seed give the same student, initial weights included (on the CPU).
    again = tmp_path / "again"
    assert main(["--root", str(tmp_path / "studies"), "distill", "--family", "resnet", "--width", "0.25", "--depth",
                 "0.25", "--loss", "kd", "--temperature", "4", "--alpha", "0.9", "--epochs", "2", "--teacher", arch,
                 "--teacher-checkpoint", str(ckpt), "--out", str(again), "--input-size", "16", "--device", "cpu"]) == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_resume_with_another_latency_runtime_exits_2(tmp_path: Path, tiny_teacher: tuple[str, Path],
                                                     space_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A study never mixes runtimes: started with eager PyTorch, resuming with the CPU default (ONNX Runtime) is
    # refused before any trial runs, naming the runtimes and the option that matches the study.
    run_search(settings(tmp_path, tiny_teacher, space_file, budget=1, latency_runtime="torch"))
    study = load(tmp_path)
    assert study.user_attrs["latency_settings"]["runtime"] == "torch"
    assert study.trials[0].user_attrs["latency"]["runtime"] == "torch"
    arch, ckpt = tiny_teacher
    code = run_cli(["--root", str(tmp_path / "studies"), "search", "--space", str(space_file), "--budget", "2",
                    "--teacher", arch, "--teacher-checkpoint", str(ckpt), "--no-mlflow", "--train-limit", "160",
                    "--device", "cpu", "--sampler", "random", "--seed", "3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "runtime 'onnxruntime' (study: 'torch')" in err and "--latency-runtime torch" in err, err
    assert len(load(tmp_path).trials) == 1


def test_front_is_retimed_together_before_the_report(tmp_path: Path, tiny_teacher: tuple[str, Path],
                                                     space_file: Path) -> None:
    # The default runtime on a CPU is ONNX Runtime; the report re-times the front candidates together and its
    # figures (with intervals) are what the front, the picks and `autokd export` read; the first stays beside.
    space_file.write_text(TINY_SPACE.replace("  width: 0.25\n", "  width: {low: 0.25, high: 0.5}\n"))
    run_search(settings(tmp_path, tiny_teacher, space_file, budget=3, epochs=1))
    study = load(tmp_path)
    assert study.user_attrs["latency_settings"]["runtime"] == "onnxruntime"
    retime = study.user_attrs["latency_retime"]
    assert retime["signature"] == study.user_attrs["latency_device"] and retime["archs"]
    points = {p.number: p for p in trial_points(study)}
    retimed = [p for p in points.values() if p.arch_key in retime["archs"]]
    assert retimed
    for p in retimed:
        fig = retime["archs"][p.arch_key]
        assert p.latency_ms == fig["median_ms"] and p.latency_ci == (fig["low_ms"], fig["high_ms"])
        assert p.latency_first_ms == study.trials[p.number].user_attrs["latency"]["median_ms"]
        assert p.acc_ci is not None and p.acc_ci[0] <= p.val_acc <= p.acc_ci[1]
    csv_text = (tmp_path / "studies" / "digits-tiny" / "report" / "front.csv").read_text()
    assert "latency_low_ms" in csv_text.splitlines()[0] and "extra.latency_first_ms" in csv_text.splitlines()[0]


def _cli_resume(tmp_path: Path, tiny_teacher: tuple[str, Path], space_file: Path, *extra: str) -> int:
    arch, ckpt = tiny_teacher
    return run_cli(["--root", str(tmp_path / "studies"), "search", "--space", str(space_file), "--budget", "3",
                    "--teacher", arch, "--teacher-checkpoint", str(ckpt), "--no-mlflow", "--train-limit", "160",
                    "--device", "cpu", "--sampler", "random", "--seed", "3", "--epochs", "1", *extra])


def test_int8_latency_search_times_int8_models_and_reports_both_accuracies(
        tmp_path: Path, tiny_teacher: tuple[str, Path], space_file: Path, capsys: pytest.CaptureFixture[str],
        timed_onnx: list) -> None:
    # --latency-precision int8: every ONNX model the search times (each trial's, then the report's re-timing of
    # the front) is the student's INT8 model; the study pins the precision (resuming with fp32 is exit 2, study
    # unchanged); the report shows each front member's fp32 and int8 test accuracy.
    from autokd.latency.quantize import quantized_op_counts

    timed = timed_onnx
    run_search(settings(tmp_path, tiny_teacher, space_file, budget=2, epochs=1, latency_precision="int8"))
    study = load(tmp_path)
    assert study.user_attrs["latency_settings"]["precision"] == "int8"
    assert study.user_attrs["latency_device"].endswith("-int8")
    assert len(timed) >= 2  # the trials' measurement (one architecture: cached after the first), the re-timing
    assert all(quantized_op_counts(b).get("QuantizeLinear", 0) > 0 for b in timed)
    for t in study.trials:
        measured = t.user_attrs["latency"]
        assert measured["precision"] == "int8" and measured["runtime"] == "onnxruntime"
    first = study.trials[0].user_attrs["latency"]
    assert first["quantize_s"] > 0 and not first["cache_hit"]
    assert study.user_attrs["latency_retime"]["signature"] == study.user_attrs["latency_device"]

    report = tmp_path / "studies" / "digits-tiny" / "report"
    rows = (report / "front.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "fp32_test_acc" in header and "int8_test_acc" in header and "extra.int8_test_acc" not in header
    for row in rows[1:]:
        cells = dict(zip(header, row.split(",")))
        assert 0.0 <= float(cells["fp32_test_acc"]) <= 1.0 and 0.0 <= float(cells["int8_test_acc"]) <= 1.0
        assert (tmp_path / "studies" / "digits-tiny" / "trials" / cells["number"] / "int8_test_acc.json").is_file()
    assert "int8 test %" in (report / "summary.md").read_text()
    assert "int8 test %" in (report / "report.html").read_text()

    capsys.readouterr()
    assert _cli_resume(tmp_path, tiny_teacher, space_file) == 2  # the default precision, fp32
    err = capsys.readouterr().err
    assert "latency precision int8" in err and "resume it with --latency-precision int8" in err, err
    assert len(load(tmp_path).trials) == 2
    assert load(tmp_path).user_attrs["latency_settings"]["precision"] == "int8"


def test_fp32_study_resumed_with_int8_exits_2(tmp_path: Path, tiny_teacher: tuple[str, Path], space_file: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run_search(settings(tmp_path, tiny_teacher, space_file, budget=1, epochs=1))
    before = load(tmp_path).user_attrs
    assert before["latency_settings"]["precision"] == "fp32" and not before["latency_device"].endswith("-int8")
    capsys.readouterr()
    assert _cli_resume(tmp_path, tiny_teacher, space_file, "--latency-precision", "int8",
                       "--allow-mixed-latency") == 2
    err = capsys.readouterr().err
    assert "latency precision fp32" in err and "resume it with --latency-precision fp32" in err, err
    study = load(tmp_path)
    assert len(study.trials) == 1 and study.user_attrs == before


def test_distill_from_trial_trains_that_trial_again(tmp_path: Path, tiny_teacher: tuple[str, Path],
                                                    space_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arch, ckpt = tiny_teacher
    run_search(settings(tmp_path, tiny_teacher, space_file, budget=2, prune=False))
    study = load(tmp_path)
    trial = study.trials[1]
    root = str(tmp_path / "studies")
    out = tmp_path / "again"
    assert main(["--root", root, "distill", "--from-trial", "1", "--epochs", "1", "--teacher-checkpoint", str(ckpt),
                 "--out", str(out), "--device", "cpu", "--seed", "5"]) == 0
    config = json.loads((out / "config.json").read_text())
    params = trial.user_attrs["params"]
    assert config["from_trial"] == "digits-tiny#1" and config["epochs"] == 1 and config["seed"] == 5
    assert config["student"]["family"] == params["family"] and config["loss"] == params["loss"]
    assert config["lr"] == pytest.approx(params["lr"]) and config["batch_size"] == params["batch_size"]
    assert config["loss_params"] == {k.split(".", 1)[1]: v for k, v in params.items()
                                     if k.startswith(params["loss"] + ".")}
    assert config["student"]["key"] == trial.user_attrs["arch_key"]
    # All the training images by default: the search used 160 (train_limit); the split has 1,078.
    assert config["data_fingerprint"] != study.user_attrs["data_fingerprint"]
    capsys.readouterr()
    # The trial fixes the student: giving it as well is a contradiction; a trial that is not there is named.
    assert main(["--root", root, "distill", "--from-trial", "1", "--family", "regnet"]) == 2
    assert "--family cannot be given with --from-trial" in capsys.readouterr().err
    assert main(["--root", root, "distill", "--from-trial", "1", "--views", "2"]) == 2  # the study's space sets it
    assert "--views cannot be given with --from-trial" in capsys.readouterr().err
    assert main(["--root", root, "distill", "--from-trial", "7"]) == 2
    assert "has no trial 7" in capsys.readouterr().err
    assert main(["--root", root, "distill", "--study", "digits-tiny"]) == 2
    assert "only apply with --from-trial" in capsys.readouterr().err


REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (REAL_FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason="needs Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist)")
def test_a_search_on_a_slice_of_real_fashion_mnist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The real files from the Debian package, no --data-dir: the built-in space, its default teacher, a slice.
    root = str(tmp_path / "studies")
    assert main(["--root", root, "search", "--dataset", "fashion-mnist", "--space", "fashion", "--train-limit",
                 "300", "--budget", "2", "--epochs", "1", "--no-mlflow", "--device", "cpu"]) == 0
    study = load(tmp_path, "fashion-mnist-fashion")
    assert len([t for t in study.trials if t.state.is_finished()]) == 2
    assert study.user_attrs["dataset"] == "fashion-mnist" and study.user_attrs["val_images"] == 6000
    assert study.user_attrs["teacher"].startswith("resnet10t@")
    capsys.readouterr()
    # A wrong --data-dir names the ways to get the files.
    assert main(["--root", root, "search", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nope"),
                 "--budget", "1", "--no-mlflow"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err

"""Every trial in MLflow: a tiny real search against a real `mlflow server`, read back through MLflow's API.

Also: a search terminated by SIGTERM leaves its runs KILLED (never RUNNING) and exits 130, and `autokd ui`
really serves the MLflow UI for the local store.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import free_port, mlflow_rest, repo_pythonpath, split_runs
from test_search import TINY_SPACE, settings

from autokd.search import objective
from autokd.search.run import run_search
from autokd.study.record import trial_state
from autokd.study.store import make_storage
from autokd.tracking import default_tracking_uri, make_tracker

pytestmark = pytest.mark.slow

FAIL_TRIAL = 2  # the trial the first search fails on purpose (after one trained epoch)
STALLED_TRIAL = 4  # the trial that reports 0 accuracy, so that it is pruned at its first rung


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(client: Any, study_name: str) -> list[Any]:
    experiment = client.get_experiment_by_name(study_name)
    assert experiment is not None, f"no MLflow experiment named after the study {study_name!r}"
    return client.search_runs([experiment.experiment_id], max_results=1000)


def _inject_faults(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """A real search, except: trial FAIL_TRIAL reports a perfect first epoch and then raises (covers the FAIL
    mapping whatever the latencies at its rung), and
    trial STALLED_TRIAL reports 0 validation accuracy every epoch, so the pruner must stop it at its first rung
    (every peer there has the same latency and a higher accuracy) whatever the seed's trials learn."""
    real = objective.distill

    def distill(student: Any, loss_fn: Any, data: Any, cfg: Any, teacher: Any = None, views: Any = None,
                on_epoch: Any = None, on_step: Any = None) -> Any:
        trial_number = cfg.seed - seed  # run_trial trains with seed + trial number
        if trial_number == STALLED_TRIAL:
            def stalled(result: Any) -> None:
                result.val_acc = 0.0
                on_epoch(result)

            return real(student, loss_fn, data, cfg, teacher=teacher, views=views, on_epoch=stalled,
                        on_step=on_step)
        if trial_number != FAIL_TRIAL:
            return real(student, loss_fn, data, cfg, teacher=teacher, views=views, on_epoch=on_epoch,
                        on_step=on_step)

        def failing(result: Any) -> None:
            result.val_acc = 1.0  # dominated by no peer, so its rung cannot prune it before the failure
            on_epoch(result)
            raise RuntimeError("injected failure after epoch 1")

        return real(student, loss_fn, data, cfg, teacher=teacher, views=views, on_epoch=failing)

    monkeypatch.setattr(objective, "distill", distill)


def _check_trial_run(client: Any, run: Any, trial: optuna.trial.FrozenTrial, study_name: str, parent_id: str,
                     teacher_arch: str) -> None:
    state = trial_state(trial)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    where = f"trial {trial.number} ({state})"
    assert tags["mlflow.parentRunId"] == parent_id, where
    assert run.info.run_name == f"trial-{trial.number}", where
    assert tags["autokd.study"] == study_name and tags["autokd.role"] == "trial", where
    assert tags["autokd.trial"] == str(trial.number), where
    assert tags["autokd.state"] == state, where
    assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "INFEASIBLE": "FINISHED",
                               "FAIL": "FAILED"}[state], where

    # Params: every sampled parameter, the resolved timm kwargs, the teacher.
    assert trial.user_attrs["params"], where
    for key, value in trial.user_attrs["params"].items():
        assert params[key] == str(value), (where, key)
    timm = trial.user_attrs["timm"]
    assert params["timm.model_name"] == timm["model_name"], where
    for key, value in timm["kwargs"].items():
        assert params[f"timm.{key}"] == str(value), (where, key)
    assert params["teacher"] == teacher_arch and params["arch_key"] == trial.user_attrs["arch_key"], where

    # Latency, size and cost: measured before training, so every trial has them.
    latency = trial.user_attrs["latency"]
    assert metrics["latency_ms"] == pytest.approx(latency["median_ms"]), where
    assert metrics["latency_iqr_ms"] == pytest.approx(latency["iqr_ms"]), where
    assert metrics["params"] == latency["params"] and metrics["macs"] == latency["macs"], where

    # One point per trained epoch at step=epoch, the same values as the trial's learning curve.
    curve = trial.user_attrs.get("curve", [])
    history = sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, len(curve) + 1)), where
    assert [m.value for m in history] == pytest.approx(curve), where
    for key in ("train_loss", "lr"):
        assert len(client.get_metric_history(run.info.run_id, key)) == len(curve), (where, key)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "student")}
    if state == "COMPLETE":
        assert metrics["final_val_acc"] == pytest.approx(trial.values[0]), where
        assert {"student/model.safetensors", "student/config.json"} <= artifacts, where
    else:
        assert "final_val_acc" not in metrics and not artifacts, where
    if state == "PRUNED":
        assert tags["autokd.prune_rung"] == str(trial.user_attrs["pruned_at_epoch"]) == str(len(curve)), where
    else:
        assert "autokd.prune_rung" not in tags, where
    if state == "FAIL":
        assert "injected failure" in tags["autokd.fail_reason"] and "autokd.traceback" in tags, where
    if state == "INFEASIBLE":
        assert "--max-latency-ms" in tags["autokd.fail_reason"] and not curve, where


def _check_study(uri: str, study: optuna.Study, teacher_arch: str) -> str:
    """Everything about the study's runs; returns the parent run id."""
    client = _client(uri)
    runs = _runs(client, study.study_name)
    parents, children = split_runs(runs)
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0]
    assert parent.info.run_id == study.user_attrs["mlflow_parent_run_id"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == study.study_name
    assert parent.data.tags["autokd.role"] == "parent" and parent.data.tags["autokd.study"] == study.study_name
    assert parent.data.params["teacher"].startswith(teacher_arch + "@")
    started = [t.number for t in study.trials if t.state != optuna.trial.TrialState.WAITING]
    assert sorted(children) == started  # exactly one child run per trial
    for trial in (t for t in study.trials if t.number in children):
        _check_trial_run(client, children[trial.number], trial, study.study_name, parent.info.run_id, teacher_arch)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    # Through the REST API as well: nothing RUNNING in the experiment.
    found = mlflow_rest(uri, "runs/search", {"experiment_ids": [parent.info.experiment_id], "max_results": 1000,
                                       "filter": "attributes.status = 'RUNNING'"})
    assert not found.get("runs")
    return parent.info.run_id


def test_every_trial_in_mlflow_server(tmp_path: Path, tiny_teacher: tuple[str, Path], mlflow_server: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    name = "e2e-server"
    seed = 0
    _inject_faults(monkeypatch, seed)
    s = settings(tmp_path, tiny_teacher, space, budget=6, study=name, mlflow=True, tracking_uri=mlflow_server,
                 seed=seed)
    summary = run_search(s)
    study = optuna.load_study(study_name=name, storage=make_storage(None, tmp_path / "studies"))
    states = [trial_state(t) for t in study.trials]
    assert len(states) == 6 and states[FAIL_TRIAL] == "FAIL", states
    assert states[STALLED_TRIAL] == "PRUNED" and states.count("COMPLETE") >= 2, states
    parent_id = _check_study(mlflow_server, study, tiny_teacher[0])
    for t in study.trials:  # pruned trials trained (and logged) fewer epochs than completed ones
        assert len(t.user_attrs["curve"]) == {"COMPLETE": 4, "PRUNED": len(t.user_attrs["curve"]), "FAIL": 1}[
            trial_state(t)]
        assert trial_state(t) != "PRUNED" or len(t.user_attrs["curve"]) < 4

    # Every MLflow call of a trial is timed in tracking_s (the overhead benchmark's figure); the buckets add up
    # to no more than the trial's time, pruned trials included.
    for outcome in summary.outcomes:
        buckets = ("sample_s", "latency_s", "tracking_s", "epoch_bookkeeping_s", "train_s", "save_s")
        assert outcome.timings["tracking_s"] > 0 and all(outcome.timings.get(k, 0.0) >= 0 for k in buckets)
        assert sum(outcome.timings.get(k, 0.0) for k in buckets) <= outcome.seconds
        assert outcome.state == "FAIL" or outcome.timings["train_s"] > 0

    # The report written at the end of the search is attached to the parent run.
    listed = mlflow_rest(mlflow_server, "artifacts/list", query={"run_id": parent_id, "path": "report"})
    names = {Path(f["path"]).name for f in listed.get("files", [])}
    local = {p.name for p in (tmp_path / "studies" / name / "report").iterdir() if p.is_file()}
    assert {"report.html", "front.csv"} <= names and local <= names, (names, local)

    # A second invocation (top-up) reuses the parent run; its new trials are rejected on latency (INFEASIBLE).
    monkeypatch.undo()
    run_search(settings(tmp_path, tiny_teacher, space, budget=8, study=name, mlflow=True,
                        tracking_uri=mlflow_server, seed=seed, max_latency_ms=1e-6))
    study = optuna.load_study(study_name=name, storage=make_storage(None, tmp_path / "studies"))
    assert [trial_state(t) for t in study.trials][6:] == ["INFEASIBLE", "INFEASIBLE"]
    assert _check_study(mlflow_server, study, tiny_teacher[0]) == parent_id

    with urllib.request.urlopen(mlflow_server + "/", timeout=30) as resp:
        assert resp.status == 200


# ----------------------------------------------------------------------------------------------------------
# SIGTERM
# ----------------------------------------------------------------------------------------------------------

LONG_SPACE = TINY_SPACE.replace("epochs: 4", "epochs: 40")  # a trial that is surely still training when killed


def _search_cmd(root: Path, space: Path, tiny_teacher: tuple[str, Path], *extra: str) -> list[str]:
    arch, ckpt = tiny_teacher
    return [sys.executable, "-m", "autokd.cli", "--root", str(root), "search", "--space", str(space),
            "--teacher", arch, "--teacher-checkpoint", str(ckpt), "--train-limit", "160", "--device", "cpu",
            "--sampler", "random", "--seed", "3", *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo_pythonpath())


def _wait_for_training_trial(proc: subprocess.Popen, root: Path, name: str, log: Path, timeout: float = 240) -> int:
    """Poll the Optuna journal until a RUNNING trial has 2 epochs in its curve; returns its number."""
    deadline = time.monotonic() + timeout
    journal = root / "optuna.journal"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"search exited early with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if journal.is_file():
            try:
                study = optuna.load_study(study_name=name, storage=make_storage(None, root))
            except KeyError:
                study = None
            for t in study.get_trials(deepcopy=False) if study else []:
                if t.state == optuna.trial.TrialState.RUNNING and len(t.user_attrs.get("curve", [])) >= 2:
                    return t.number
        time.sleep(0.2)
    pytest.fail(f"no trial started training within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.faults
@pytest.mark.parametrize("store", ["local", "server"])
def test_sigterm_leaves_runs_killed(tmp_path: Path, tiny_teacher: tuple[str, Path], store: str,
                                    request: pytest.FixtureRequest) -> None:
    root = tmp_path / "studies"
    space = tmp_path / "long.yaml"
    space.write_text(LONG_SPACE)
    name = f"sigterm-{store}"
    uri = request.getfixturevalue("mlflow_server") if store == "server" else default_tracking_uri(root)
    extra = ["--tracking-uri", uri] if store == "server" else []
    log = tmp_path / "search.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(_search_cmd(root, space, tiny_teacher, "--budget", "3", "--study", name,
                                            "--no-prune", *extra),
                                cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        number = _wait_for_training_trial(proc, root, name, log)
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert "terminated" in text, text[-3000:]

    study = optuna.load_study(study_name=name, storage=make_storage(None, root))
    trial = study.trials[number]
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["autokd_state"] == "INTERRUPTED"
    client = _client(uri)
    runs = _runs(client, name)
    parents, children = split_runs(runs)
    # A stopped search ends its parent KILLED (FINISHED is for a search that reached its budget).
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    # one run per trial that started (an interrupted trial may have been queued again, WAITING)
    assert sorted(children) == [t.number for t in study.trials if t.state != optuna.trial.TrialState.WAITING]
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    killed = children[number]
    assert killed.info.status == "KILLED" and killed.data.tags["autokd.state"] == "INTERRUPTED"
    assert killed.info.end_time is not None
    # Epochs logged up to the kill: the trial's curve, less the last point when SIGTERM landed between the
    # curve update and its MLflow batch. We killed once the curve had 2 points, so epoch 1 is surely there.
    steps = sorted(m.step for m in client.get_metric_history(killed.info.run_id, "val_acc"))
    curve = trial.user_attrs["curve"]
    assert steps in (list(range(1, len(curve) + 1)), list(range(1, len(curve)))) and steps, (steps, curve)


# ----------------------------------------------------------------------------------------------------------
# autokd ui
# ----------------------------------------------------------------------------------------------------------

def _port_open(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.faults
def test_autokd_ui_serves_the_local_store(tmp_path: Path) -> None:
    root = tmp_path / "studies"
    tracker = make_tracker(None, True, root, "ui-study")
    parent = tracker.create_parent_run("ui-study", {}, {"budget": 1})
    report = tmp_path / "report.md"
    report.write_text("# front\n")
    tracker.log_parent_artifacts(parent, [report])
    run = tracker.start_trial(parent, 0, {"lr": 0.1}, {})
    run.log_epoch(1, {"val_acc": 0.5})
    run.end("COMPLETE")

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "autokd.cli", "--root", str(root), "ui", "--port", str(port)],
                                cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"autokd ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(uri + "/", timeout=5) as resp:
                    assert resp.status == 200
                    break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, f"autokd ui did not answer in 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        # It serves this store: the runs, their metrics and the parent's report artifact.
        found = mlflow_rest(uri, "runs/search", {"experiment_ids": [tracker.experiment_id], "max_results": 10})
        assert {r["info"]["run_name"] for r in found["runs"]} == {"ui-study", "trial-0"}
        listed = mlflow_rest(uri, "artifacts/list", query={"run_id": parent, "path": "report"})
        assert [f["path"] for f in listed["files"]] == ["report/report.md"]
        # Its link, printed once, once the server answered (autokd polls on its own: the line may trail ours).
        while "MLflow UI for" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"{default_tracking_uri(root)}" in log.read_text()
        assert log.read_text().count(f"{uri}/") == 1, log.read_text()[-3000:]
    finally:
        proc.terminate()  # SIGTERM to autokd only: the MLflow server it started must go with it
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("autokd ui did not stop on SIGTERM")
    deadline = time.monotonic() + 60
    while _port_open(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        assert not _port_open(port), "the MLflow UI outlived `autokd ui`"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of this test's process group
    assert code == 0  # stopping the UI is how it is meant to end
    assert list(cwd.iterdir()) == []  # nothing written into the working directory


def test_autokd_ui_without_a_store_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from autokd.cli import main

    root = tmp_path / "studies"
    assert main(["--root", str(root), "ui", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert str(root / "mlflow.db") in err and "autokd search" in err
    assert not root.exists()


def test_report_and_export_fetch_checkpoints_from_mlflow(tmp_path: Path, tiny_teacher: tuple[str, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """On a machine that did not train the students (here: their local checkpoints are gone), `autokd export`
    and `autokd report` take them from the trials' MLflow runs; with neither, the error names what is missing."""
    import shutil

    from autokd.cli import main

    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    name, root = "fetch", tmp_path / "studies"
    run_search(settings(tmp_path, tiny_teacher, space, budget=3, study=name, mlflow=True, prune=False))
    study = optuna.load_study(study_name=name, storage=make_storage(None, root))
    complete = [t.number for t in study.trials if trial_state(t) == "COMPLETE"]
    assert complete
    trials = root / name / "trials"

    shutil.rmtree(trials)
    out = tmp_path / "exported"
    argv = ["--root", str(root), "export", "--study", name, "--trial", str(complete[0]), "--out", str(out),
            "--format", "safetensors"]
    assert main(argv) == 0, capsys.readouterr().err
    assert f"trial(s) {complete[0]} from MLflow" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (trials / str(complete[0]) / "model.safetensors").is_file()

    shutil.rmtree(trials)
    assert main(["--root", str(root), "report", "--study", name]) == 0, capsys.readouterr().err
    assert "from MLflow" in capsys.readouterr().out
    assert (root / name / "report" / "front.csv").is_file()

    # Without the MLflow copies there is nothing to fetch: a clear error naming the study and trial, exit 2.
    shutil.rmtree(trials)
    shutil.rmtree(root / "mlartifacts")
    capsys.readouterr()
    assert main(argv[:-4] + ["--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr()
    assert f"study '{name}' trial {complete[0]}" in err.err and "could not fetch" in err.out

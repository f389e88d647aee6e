"""A real `mlflow server` killed mid-search and started again: no run is lost, none is logged twice."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import _mlflow_cli, free_port, repo_pythonpath, split_runs
from test_search import TINY_SPACE

from autokd.study.record import trial_state
from autokd.study.store import make_storage

pytestmark = pytest.mark.slow



def _start_server(root: Path, port: int) -> subprocess.Popen:
    log = open(root / "server.log", "ab")  # noqa: SIM115 - the server writes it until it is killed
    cmd = _mlflow_cli() + ["server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                           "--artifacts-destination", str(root / "artifacts")]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True, env=env)
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except (urllib.error.URLError, OSError):
            pass
        assert time.monotonic() < deadline, "mlflow server did not start in 180 s"
        time.sleep(0.3)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _finished(root: Path, name: str) -> int:
    try:
        study = optuna.load_study(study_name=name, storage=make_storage(None, root))
    except KeyError:
        return 0
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())


def _wait(proc: subprocess.Popen, what: Any, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        if proc.poll() is not None:
            return
        time.sleep(0.2)


def test_server_killed_mid_search_loses_no_run(tmp_path: Path, tiny_teacher: tuple[str, Path]) -> None:
    from mlflow.tracking import MlflowClient

    server_root = tmp_path / "server"
    server_root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(server_root, port)
    root, name = tmp_path / "studies", "outage"
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    arch, ckpt = tiny_teacher
    log = tmp_path / "search.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo_pythonpath())
    cmd = [sys.executable, "-m", "autokd.cli", "--root", str(root), "search", "--space", str(space), "--teacher",
           arch, "--teacher-checkpoint", str(ckpt), "--train-limit", "160", "--device", "cpu", "--sampler", "random",
           "--seed", "5", "--budget", "8", "--study", name, "--no-prune", "--tracking-uri", uri]
    with open(log, "wb") as out:
        search = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait(search, lambda: _finished(root, name) >= 2, log)
        _kill(server)  # the tracking server dies mid-search
        # Down for long enough that MLflow's own HTTP retries give up (a quick restart is bridged by them).
        _wait(search, lambda: _finished(root, name) >= 4 and "is not answering" in log.read_text(), log)
        server = _start_server(server_root, port)  # ... and comes back (same store) while or after it runs
        assert search.wait(timeout=600) == 0, log.read_text()[-3000:]
        text = log.read_text()
        spools = root / name / "mlflow_spool"
        if spools.is_dir() and list(spools.glob("*.jsonl")):  # the search ended before the server was back
            sync = subprocess.run([sys.executable, "-m", "autokd.cli", "--root", str(root), "sync-mlflow", "--study",
                                   name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert sync.returncode == 0, sync.stdout + sync.stderr
            text += sync.stdout + sync.stderr
        assert not spools.exists() or not list(spools.glob("*.jsonl"))
        print("\n".join(line for line in text.splitlines() if "MLflow" in line or "mlflow" in line))  # for -s

        # One line when the outage starts, none per call, and no traceback.
        assert text.count("is not answering") == 1, text[-4000:]
        assert "Traceback" not in text, text[-4000:]
        assert re.search(r"answers again; sent the \d+ call|MLflow: sent \d+ call", text), text[-4000:]

        study = optuna.load_study(study_name=name, storage=make_storage(None, root))
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(name)
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        parents, children = split_runs(runs)
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert sorted(children) == [t.number for t in study.trials] and len(study.trials) == 8
        for t in study.trials:
            run = children[t.number]
            state = trial_state(t)
            assert run.data.tags["autokd.state"] == state and run.info.status == "FINISHED", (t.number, state)
            assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
            history = sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.step)
            assert [m.step for m in history] == list(range(1, len(t.user_attrs["curve"]) + 1)), t.number
            assert [m.value for m in history] == pytest.approx(t.user_attrs["curve"]), t.number
            if state == "COMPLETE":
                assert run.data.metrics["final_val_acc"] == pytest.approx(t.values[0])
                artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "student")}
                assert "student/model.safetensors" in artifacts, t.number
            assert run.info.end_time >= run.info.start_time
    finally:
        if search.poll() is None:
            search.kill()
            search.wait()
        _kill(server)


@pytest.mark.slow
def test_outage_mid_run_is_replayed_in_order_when_the_store_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The store stops answering between two epochs and answers again before the run ends: the spool is sent in
    order by the same process, one line when the outage starts and one when it ends."""
    import logging

    from mlflow.tracking import MlflowClient

    from autokd import tracking
    from autokd.tracking import _mlflow as _mlflow_tracking
    monkeypatch.setattr(_mlflow_tracking, "PROBE_INTERVAL_S", 0.0)
    root = tmp_path / "studies"
    tracker = tracking.make_tracker(None, True, root, "flaky")
    parent = tracker.create_parent_run("flaky", {}, {"budget": 1})
    client = tracker._client  # noqa: SLF001 - the tracker's own client is what goes down
    down = {"now": False}

    def failing(method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if down["now"]:
                raise ConnectionError("Connection refused")
            return method(*args, **kwargs)
        return call

    for name in ("log_batch", "set_terminated", "get_experiment", "create_run"):
        monkeypatch.setattr(client, name, failing(getattr(client, name)))
    with caplog.at_level(logging.WARNING, logger="autokd.tracking"):
        run = tracker.start_trial(parent, 0, {"lr": 0.1}, {})
        run.log_epoch(1, {"val_acc": 0.1})
        tracker.flush()
        down["now"] = True
        run.log_epoch(2, {"val_acc": 0.2})
        run.log_epoch(3, {"val_acc": 0.3})
        late = tracker.start_trial(parent, 1, {"lr": 0.2}, {})  # created during the outage
        late.log_epoch(1, {"val_acc": 0.5})
        tracker.flush()
        assert tracker.spooling and list((root / "flaky" / "mlflow_spool").glob("*.jsonl"))
        down["now"] = False
        run.log_epoch(4, {"val_acc": 0.4})
        run.end("COMPLETE")
        late.end("PRUNED")
        tracker.end_parent(parent)
        tracker.flush()
    assert not tracker.spooling and not (root / "flaky" / "mlflow_spool").exists()
    assert caplog.text.count("is not answering") == 1 and caplog.text.count("answers again; sent the 5 call(s)") == 1, caplog.text
    reader = MlflowClient(tracking_uri=tracker.tracking_uri)
    history = sorted(reader.get_metric_history(run.run_id, "val_acc"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    runs = reader.search_runs([tracker.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["flaky", "trial-0", "trial-1"]  # none twice
    status = {r.info.run_name: r.info.status for r in runs}
    assert status == {"flaky": "FINISHED", "trial-0": "FINISHED", "trial-1": "FINISHED"}
    assert [m.step for m in reader.get_metric_history(late.run_id, "val_acc")] == [1]

"""autokd.tracking against real MLflow stores: a local SQLite store and a real `mlflow server` process."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, mlflow_rest, repo_pythonpath

from autokd.errors import UserError
from autokd.tracking import (
    Tracker,
    TrialRun,
    default_tracking_uri,
    make_tracker,
    ui_command,
)
from autokd.tracking.base import MLFLOW_STATUS


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite database with its schema already created (migrations take seconds per fresh file)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments(max_results=1)
    return db


@pytest.fixture
def studies(tmp_path: Path, migrated_db: Path) -> Path:
    """A studies root whose local MLflow store is ready to use."""
    root = tmp_path / "studies"
    root.mkdir()
    shutil.copy(migrated_db, root / "mlflow.db")
    return root


def _log_study(tracker: Tracker, tmp_path: Path) -> dict[str, str]:
    """The logging a two-trial search does; returns the run ids."""
    parent = tracker.create_parent_run("s1", {"autokd.dataset": "digits"}, {"budget": 2, "long": "x" * 7000})
    assert parent
    report = tmp_path / "report.md"
    report.write_text("# front\n")
    tracker.log_parent_artifacts(parent, [report])
    runs = {}
    for n in (0, 1):
        run = tracker.start_trial(parent, n, {"lr": 0.01 * (n + 1), "family": "resnet"}, {"autokd.arch": f"resnet-{n}"})
        run.log_epoch(1, {"val_acc": 0.5, "train_loss": 1.0})
        run.log_epoch(2, {"val_acc": 0.75, "train_loss": 0.5})
        run.log_params({"width": 0.5})
        run.set_tags({"autokd.key": f"k{n}"})
        runs[f"trial{n}"] = run.run_id
        if n == 0:
            run.log_metrics({"latency_ms": 1.5})
            art = tmp_path / "trial0"
            art.mkdir()
            (art / "spec.json").write_text("{}")
            run.log_artifacts(art, "student")
            run.end("COMPLETE")
            run.end("FAIL", "ignored: already ended")  # idempotent
        else:
            run.end("FAIL", "non-finite loss at epoch 2")
    runs["parent"] = parent
    tracker.end_parent(parent)  # the search ends its parent once the budget is reached
    tracker.flush()  # trial runs end without waiting for the background writer; a search flushes like this
    return runs


def test_local_store_parent_and_children(tmp_path: Path, studies: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    tracker = make_tracker(None, True, studies, "s1")
    assert tracker.enabled
    assert tracker.tracking_uri == default_tracking_uri(studies) == f"sqlite:///{studies.resolve() / 'mlflow.db'}"
    ids = _log_study(tracker, tmp_path)

    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    parent = client.get_run(ids["parent"])
    assert parent.info.status == "FINISHED"  # ended by end_parent (a search ends it when the budget is reached)
    assert parent.info.run_name == "s1"
    assert parent.data.tags["autokd.role"] == "parent" and parent.data.tags["autokd.study"] == "s1"
    assert parent.data.tags["autokd.dataset"] == "digits"
    assert parent.data.params["budget"] == "2"
    assert len(parent.data.params["long"]) == 6000  # truncated to MLflow's limit, not rejected
    assert [a.path for a in client.list_artifacts(ids["parent"], "report")] == ["report/report.md"]

    t0, t1 = client.get_run(ids["trial0"]), client.get_run(ids["trial1"])
    assert (t0.info.status, t1.info.status) == ("FINISHED", "FAILED")
    assert t0.info.run_name == "trial-0" and t1.info.run_name == "trial-1"
    for n, run in enumerate((t0, t1)):
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == ids["parent"]
        assert tags["autokd.role"] == "trial" and tags["autokd.trial"] == str(n) and tags["autokd.study"] == "s1"
        assert tags["autokd.arch"] == f"resnet-{n}" and tags["autokd.key"] == f"k{n}"
        assert run.data.params == {"lr": str(0.01 * (n + 1)), "family": "resnet", "width": "0.5"}
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 0.5), (2, 0.75)]
    assert t0.data.tags["autokd.state"] == "COMPLETE" and "autokd.fail_reason" not in t0.data.tags
    assert t1.data.tags["autokd.state"] == "FAIL"
    assert t1.data.tags["autokd.fail_reason"] == "non-finite loss at epoch 2"
    assert t0.data.metrics["latency_ms"] == 1.5
    assert [a.path for a in client.list_artifacts(ids["trial0"], "student")] == ["student/spec.json"]

    # artifacts live with the studies, nothing lands in the working directory
    assert list((studies / "mlartifacts" / "s1").rglob("spec.json"))
    assert list(cwd.iterdir()) == []

    # a second tracker (next invocation / other worker) reuses the experiment
    again = make_tracker(None, True, studies, "s1")
    assert again.experiment_id == tracker.experiment_id
    assert again.parent_run_exists(ids["parent"])
    assert not again.parent_run_exists("0" * 32)
    client.delete_run(ids["parent"])
    assert not again.parent_run_exists(ids["parent"])
    other = make_tracker(None, True, studies, "s2")
    assert other.experiment_id != tracker.experiment_id
    assert not other.parent_run_exists(ids["trial0"])  # a run of another study is not our parent


def test_close_stale_runs(studies: Path) -> None:
    from mlflow.tracking import MlflowClient

    tracker = make_tracker(None, True, studies, "stale")
    parent = tracker.create_parent_run("stale", {}, {})
    runs = [tracker.start_trial(parent, n, {}, {}) for n in range(5)]
    runs[4].end("PRUNED")
    states = {0: "FAIL", 1: "RUNNING", 2: "COMPLETE", 4: "PRUNED"}  # 3 is unknown to the study
    assert tracker.close_stale_runs(parent, states) == 3
    assert tracker.close_stale_runs(parent, states) == 0  # nothing left to close
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    got = {n: client.get_run(r.run_id) for n, r in enumerate(runs)}
    assert {n: r.info.status for n, r in got.items()} == {
        0: "KILLED", 1: "RUNNING", 2: "FINISHED", 3: "KILLED", 4: "FINISHED"}
    assert "worker died" in got[0].data.tags["autokd.fail_reason"]
    assert got[0].data.tags["autokd.state"] == "FAIL"
    assert got[2].data.tags["autokd.state"] == "COMPLETE" and "autokd.fail_reason" not in got[2].data.tags
    assert got[3].data.tags["autokd.state"] == "UNKNOWN"
    assert tracker.close_stale_runs(None, states) == 0


_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import mlflow.tracking  # the slow import, before the start line
    from autokd.tracking import make_tracker
    studies, parent, trial, epochs, hang = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    print("ready", flush=True)
    sys.stdin.readline()  # go
    tracker = make_tracker(None, True, Path(studies), "conc")
    run = tracker.start_trial(parent, trial, {"trial": trial}, {})
    for epoch in range(1, epochs + 1):
        run.log_epoch(epoch, {"val_acc": epoch / epochs, "train_loss": 1.0 / epoch})
    run.flush()  # logging runs in the background: what a kill -9 may lose is only what is still queued
    print(run.run_id, flush=True)
    if hang == "hang":
        time.sleep(600)
    run.end("COMPLETE")
""")


def _spawn(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=repo_pythonpath())
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, *args], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
    return proc


def _go(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()


@pytest.mark.slow
def test_two_processes_on_a_fresh_local_store(tmp_path: Path) -> None:
    """Two workers open a brand-new SQLite store at the same instant (schema creation race) and log together."""
    from mlflow.tracking import MlflowClient

    studies = tmp_path / "studies"
    procs = [_spawn([str(studies), "", str(n), "30", "no"]) for n in range(2)]
    for proc in procs:  # both past `import mlflow`: they open the fresh store at the same moment
        _go(proc)
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
        assert "failed" not in err and "locked" not in err, err[-3000:]
    client = MlflowClient(tracking_uri=default_tracking_uri(studies))
    for out, _ in outs:
        run = client.get_run(out.strip())
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 30


@pytest.mark.faults
@pytest.mark.slow
def test_close_stale_runs_after_kill_9(studies: Path) -> None:
    from mlflow.tracking import MlflowClient

    tracker = make_tracker(None, True, studies, "conc")
    parent = tracker.create_parent_run("conc", {}, {})
    proc = _spawn([str(studies), parent, "0", "2", "hang"])
    try:
        _go(proc)
        run_id = proc.stdout.readline().strip()
        assert run_id, proc.stderr.read()[-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # the dead worker could not end it
    # what Optuna reports for a trial whose worker died: FAIL
    assert tracker.close_stale_runs(parent, {0: "FAIL"}) == 1
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["autokd.fail_reason"]
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1, 2]


def test_noop_tracker_does_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tracker = make_tracker(None, False, tmp_path / "studies", "off")
    assert type(tracker) is Tracker and not tracker.enabled and tracker.tracking_uri is None
    assert tracker.create_parent_run("off", {"a": "b"}, {"x": 1}) is None
    assert not tracker.parent_run_exists("abc")
    run = tracker.start_trial(None, 0, {"lr": 0.1}, {})
    assert type(run) is TrialRun and run.run_id == ""
    run.log_epoch(1, {"val_acc": 0.5})
    run.log_metrics({"latency_ms": 1.0})
    run.log_params({"a": 1})
    run.set_tags({"t": "v"})
    run.log_artifacts(tmp_path)
    run.end("COMPLETE")
    assert tracker.close_stale_runs(None, {0: "FAIL"}) == 0
    tracker.log_parent_artifacts("", [tmp_path / "nope"])
    tracker.end_parent("")
    assert list(tmp_path.iterdir()) == []


def test_end_rejects_unknown_state(studies: Path) -> None:
    tracker = make_tracker(None, True, studies, "states")
    run = tracker.start_trial(None, 0, {}, {})
    with pytest.raises(ValueError, match="DONE"):
        run.end("DONE")
    run.end("INTERRUPTED", "Ctrl-C")
    from mlflow.tracking import MlflowClient

    got = MlflowClient(tracking_uri=tracker.tracking_uri).get_run(run.run_id)
    assert got.info.status == MLFLOW_STATUS["INTERRUPTED"] == "KILLED"
    assert "mlflow.parentRunId" not in got.data.tags


def test_trial_logging_failures_only_warn(studies: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run that vanished mid-trial (deleted in the UI) must not fail the trial."""
    from mlflow.tracking import MlflowClient

    tracker = make_tracker(None, True, studies, "gone")
    run = tracker.start_trial(None, 0, {}, {})
    MlflowClient(tracking_uri=tracker.tracking_uri).delete_run(run.run_id)
    with caplog.at_level(logging.WARNING, logger="autokd.tracking"):
        run.log_epoch(1, {"val_acc": 0.5, "bad": "not a number"})
        run.end("COMPLETE")
        tracker.flush()  # the calls run (and warn) on the background writer
    text = caplog.text
    assert "non-numeric" in text and "log_epoch 1" in text and "continuing without it" in text


def test_a_run_that_cannot_be_created_skips_its_calls(studies: Path, caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The run is created on the background writer: if that fails, the trial goes on and its calls are skipped."""
    from mlflow.tracking import MlflowClient

    tracker = make_tracker(None, True, studies, "nocreate")
    created = []

    def refuse(*args: object, **kwargs: object) -> None:
        created.append(args)
        raise RuntimeError("store is read-only")

    monkeypatch.setattr(tracker._client, "create_run", refuse)
    with caplog.at_level(logging.WARNING, logger="autokd.tracking"):
        run = tracker.start_trial(None, 7, {"lr": 0.1}, {})
        run.log_epoch(1, {"val_acc": 0.5})
        run.log_artifacts(studies)
        run.end("COMPLETE")
        tracker.flush()
    assert created and run.run_id == ""
    assert "create run for trial 7" in caplog.text and "store is read-only" in caplog.text
    monkeypatch.undo()
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    assert client.search_runs([tracker.experiment_id]) == []  # nothing was written for the trial


def test_unreachable_server_is_a_user_error(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        make_tracker(uri, True, tmp_path / "studies", "x")
    assert uri in str(err.value) and "--no-mlflow" in str(err.value) and "Start it" in str(err.value)
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "studies").exists()


def test_unusable_store_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    with pytest.raises(UserError, match="--no-mlflow") as err:
        make_tracker(uri, True, tmp_path / "studies", "x")
    assert uri in str(err.value)


def test_ui_command(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path)
    cmd = ui_command(uri, port=5123)
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == uri
    assert cmd[cmd.index("--port") + 1] == "5123" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    with pytest.raises(UserError, match="browser"):
        ui_command("http://127.0.0.1:5000")


@pytest.mark.slow
def test_tracking_server(mlflow_server: str, tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    tracker = make_tracker(mlflow_server, True, studies, "srv-study")
    assert tracker.enabled and tracker.tracking_uri == mlflow_server
    ids = _log_study(tracker, tmp_path)
    stale = tracker.start_trial(ids["parent"], 2, {}, {})
    assert tracker.close_stale_runs(ids["parent"], {0: "COMPLETE", 1: "FAIL", 2: "FAIL"}) == 1

    found = mlflow_rest(mlflow_server, "runs/search", {"experiment_ids": [tracker.experiment_id], "max_results": 50})
    runs = {r["info"]["run_id"]: r for r in found["runs"]}
    status = {rid: r["info"]["status"] for rid, r in runs.items()}
    assert status == {ids["parent"]: "FINISHED", ids["trial0"]: "FINISHED", ids["trial1"]: "FAILED",
                      stale.run_id: "KILLED"}
    tags = {t["key"]: t["value"] for t in runs[ids["trial1"]]["data"]["tags"]}
    assert tags["mlflow.parentRunId"] == ids["parent"] and tags["autokd.fail_reason"] == "non-finite loss at epoch 2"
    history = mlflow_rest(mlflow_server, "metrics/get-history", query={"run_id": ids["trial0"], "metric_key": "val_acc"})
    assert sorted(m["step"] for m in history["metrics"]) == [1, 2]
    listed = mlflow_rest(mlflow_server, "artifacts/list", query={"run_id": ids["parent"], "path": "report"})
    assert [f["path"] for f in listed["files"]] == ["report/report.md"]
    assert not studies.exists()  # the server stores everything; nothing local
    with urllib.request.urlopen(mlflow_server + "/", timeout=30) as resp:
        assert resp.status == 200


# --- a spool with lines that are not call records ------------------------------------------------------------

_SPOOLING_WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from autokd.tracking import make_tracker
    tracker = make_tracker(None, True, Path(sys.argv[1]), "spooled")
    parent = tracker.create_parent_run("spooled", {}, {"budget": 3})

    def down(*args, **kwargs):
        raise ConnectionError("Connection refused")

    for name in ("create_run", "log_batch", "set_terminated", "get_experiment", "search_runs"):
        setattr(tracker._client, name, down)  # the store stops answering: every later call is spooled
    for n in range(3):
        run = tracker.start_trial(parent, n, {"lr": 0.1 * (n + 1)}, {})
        for epoch in (1, 2):
            run.log_epoch(epoch, {"val_acc": n + epoch / 10})
        run.end("COMPLETE")
    tracker.end_parent(parent)
    print(parent)
""")

# What a crash, a disk or a hand can leave on a spool line: not UTF-8, JSON that is not a call, a torn record.
BAD_SPOOL_LINES = [b"\xff\xfe\x00not utf-8 \xc3\x28", b"[1,2,3]", b"{}",
                   b'{"op":"log_batch","key":"k","t":1,"metrics":[["val_acc",0.5,1,1',
                   b'{"op":"set_terminated","key":"k","t":1,"status":"DONE"}']


def test_a_spool_line_that_is_not_a_call_is_set_aside_and_the_calls_after_it_are_sent(
        studies: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A spool an ended process left, with bad lines among its calls (and a torn last line): the next tracker
    sends every call to the real store, sets the bad lines aside in `<spool>.rejected` and says so in one line."""
    from mlflow.tracking import MlflowClient

    proc = subprocess.run([sys.executable, "-c", _SPOOLING_WORKER, str(studies)], capture_output=True, text=True,
                          check=False, timeout=300, env=dict(os.environ, PYTHONPATH=repo_pythonpath()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent = proc.stdout.strip()
    [spool] = list((studies / "spooled" / "mlflow_spool").glob("*.jsonl"))
    calls = spool.read_bytes().splitlines()
    assert len(calls) == 19  # per trial: create, params, two epochs, state tag, end; and the parent's end
    # Bad lines first, between the calls of one run, and last (torn: no line end).
    lines = [BAD_SPOOL_LINES[0], *calls[:3], *BAD_SPOOL_LINES[1:4], *calls[3:], BAD_SPOOL_LINES[4], b'{"op":"lo']
    spool.write_bytes(b"\n".join(lines))

    with caplog.at_level(logging.INFO, logger="autokd"):
        tracker = make_tracker(None, True, studies, "spooled")  # the next search, report or sync-mlflow
    assert not list(spool.parent.glob("*.jsonl")) and not list(spool.parent.glob("*.done"))
    rejected = spool.with_name(spool.name + ".rejected")
    assert rejected.read_bytes() == b"".join(line + b"\n" for line in [*BAD_SPOOL_LINES, b'{"op":"lo'])
    notices = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert len(notices) == 1 and "set aside 6 line(s)" in notices[0] and str(rejected) in notices[0], notices
    assert "1 not UTF-8" in notices[0] and "2 not JSON" in notices[0], notices
    assert "sent 19 call(s)" in caplog.text and "not answering" not in caplog.text, caplog.text
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]

    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    runs = {r.info.run_name: r for r in client.search_runs([tracker.experiment_id])}
    assert sorted(runs) == ["spooled", "trial-0", "trial-1", "trial-2"]
    assert {name: r.info.status for name, r in runs.items()} == dict.fromkeys(runs, "FINISHED")
    assert runs["spooled"].info.run_id == parent
    for n in range(3):
        run = runs[f"trial-{n}"]
        history = sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(1, n + 0.1), (2, n + 0.2)]
        assert run.data.params["lr"] == str(0.1 * (n + 1)) and run.data.tags["autokd.state"] == "COMPLETE"
        assert run.data.tags["mlflow.parentRunId"] == parent

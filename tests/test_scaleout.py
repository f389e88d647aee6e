"""Scale-out: one study, several real worker processes, PostgreSQL storage and a real MLflow server.

Each worker gets its own `--root` and its own AUTOKD_WORKER_HOST, as if it ran on a machine of its own: no
shared teacher cache, no shared trial folders, and no pid-based reaping of each other's trials — a killed
worker is found by its missing heartbeats (1 s interval, 3 s grace period here instead of 10 s / 40 s).
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import optuna
import pytest
from conftest import repo_pythonpath
from optuna.trial import TrialState
from test_search import TINY_SPACE

from autokd.cli import main
from autokd.study.record import REQUEUED_ATTR
from autokd.study.store import ask_with_heartbeat, budget_used, fail_stale_trials, make_storage

PG = {"host": "127.0.0.1", "port": 5432}
FAST_HEARTBEAT = {"AUTOKD_HEARTBEAT_INTERVAL": "1", "AUTOKD_HEARTBEAT_GRACE": "3"}


def _pg_user() -> str | None:
    try:
        import psycopg2
    except ImportError:
        return None
    for user in ("root", "postgres"):
        try:
            psycopg2.connect(dbname="postgres", user=user, connect_timeout=3, **PG).close()
            return user
        except psycopg2.Error:
            continue
    return None


@pytest.fixture()
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (dropped afterwards); yields its SQLAlchemy URL."""
    user = _pg_user()
    if user is None:
        pytest.skip("no PostgreSQL server answers on 127.0.0.1:5432 as user root or postgres (or psycopg2 is "
                    "missing); start one to run the scale-out tests")
    import psycopg2

    name = f"autokd_test_{secrets.token_hex(4)}"
    admin = psycopg2.connect(dbname="postgres", user=user, **PG)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        yield f"postgresql://{user}@{PG['host']}:{PG['port']}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture()
def fast_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in FAST_HEARTBEAT.items():
        monkeypatch.setenv(key, value)


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=make_storage(url, Path("unused")))


# ----------------------------------------------------------------------------------------------------------
# the stale-trial check itself (one process, no training)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.postgres
@pytest.mark.slow
def test_stale_trial_is_failed_requeued_once(pg_url: str, fast_heartbeat: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOKD_HEARTBEAT_GRACE", "2")
    study = optuna.create_study(study_name="stale", storage=make_storage(pg_url, Path("unused")),
                                directions=["maximize", "minimize"])

    def start() -> optuna.Trial:
        trial, beat = ask_with_heartbeat(study)
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        beat.join()  # the worker "dies": no heartbeat after this
        return trial

    first = start()
    assert fail_stale_trials(study) == []  # within the grace period
    time.sleep(3.2)
    assert fail_stale_trials(study) == [0]
    dead = study.trials[0]
    assert dead.state == TrialState.FAIL and dead.user_attrs[REQUEUED_ATTR]
    assert "no heartbeat" in dead.user_attrs["fail_reason"]
    assert budget_used(study) == 0  # its retry takes its place
    retry = start()  # the queued retry, whose worker dies as well
    assert study.trials[1].user_attrs["retry_of"] == 0 and retry.params == first.params
    time.sleep(3.2)
    assert fail_stale_trials(study) == [1]
    trials = study.trials
    assert REQUEUED_ATTR not in trials[1].user_attrs and "not queued again" in trials[1].user_attrs["fail_reason"]
    assert budget_used(study) == 1 and not study.get_trials(states=(TrialState.WAITING,))
    # A live worker's trial keeps beating and is left alone.
    trial, beat = ask_with_heartbeat(study)
    try:
        time.sleep(3.2)
        assert fail_stale_trials(study) == []
    finally:
        beat.join()


# ----------------------------------------------------------------------------------------------------------
# three workers as three machines
# ----------------------------------------------------------------------------------------------------------

def _argv(root: Path, space: Path, url: str, tracking: str, name: str, budget: int, *extra: str) -> list[str]:
    return ["--root", str(root), "search", "--storage", url, "--tracking-uri", tracking, "--study", name,
            "--budget", str(budget), "--space", str(space), "--teacher", "test_resnet", "--train-limit", "160",
            "--device", "cpu", "--sampler", "random", "--seed", "3", *extra]


def _start(index: int, argv: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo_pythonpath(), AUTOKD_WORKER_HOST=f"machine-{index}",
               **FAST_HEARTBEAT)
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "autokd.cli", *argv], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=log.parent)


def _run_workers(tmp_path: Path, tag: str, argvs: list[list[str]], kill: dict[str, Any] | None = None,
                 url: str = "", name: str = "") -> tuple[list[int], list[str], Any]:
    """Run one worker process per argv to the end; returns exit codes, logs and the trial of a killed worker.

    With `kill`, that worker starts alone and is killed with kill -9 once one of its trials has trained an
    epoch; only then do the others start. Started together, the others could take every remaining trial
    before the victim claimed one (seen in CI), and the test would have nothing to kill.
    """
    logs = [tmp_path / f"{tag}-w{i}.log" for i in range(len(argvs))]
    procs: dict[int, subprocess.Popen] = {}
    killed = None
    try:
        if kill is not None:
            victim = kill["worker"]
            procs[victim] = _start(victim, argvs[victim], logs[victim])
            killed = _kill_mid_trial(procs[victim], f"machine-{victim}", url, name, logs)
        for i, (argv, log) in enumerate(zip(argvs, logs)):
            if i not in procs:
                procs[i] = _start(i, argv, log)
        codes = [procs[i].wait(timeout=300) for i in range(len(argvs))]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes, [log.read_text() if log.exists() else "" for log in logs], killed


def _kill_mid_trial(proc: subprocess.Popen, host: str, url: str, name: str, logs: list[Path]) -> Any:
    """kill -9 the worker once one of its trials has trained an epoch; returns that trial (as seen before)."""
    # One storage for the whole poll: a storage per poll would leave its pooled connections open until the
    # garbage collector ran, and PostgreSQL refuses clients past max_connections (seen in CI).
    storage = make_storage(url, Path("unused"))
    deadline = time.monotonic() + 200
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"worker {host} exited before it was killed:\n" + "\n".join(
                    log.read_text()[-2000:] for log in logs))
            try:
                trials = optuna.load_study(study_name=name, storage=storage).get_trials(
                    deepcopy=False, states=(TrialState.RUNNING,))
            except KeyError:
                trials = []
            mine = [t for t in trials if (t.user_attrs.get("worker") or {}).get("host") == host
                    and t.user_attrs.get("curve")]
            if mine:
                os.kill(proc.pid, signal.SIGKILL)
                assert proc.wait(timeout=30) == -signal.SIGKILL
                return mine[0]
            time.sleep(0.1)
    finally:
        storage.engine.dispose()
    pytest.fail("the worker to kill never trained a trial:\n" + "\n".join(log.read_text()[-2000:] for log in logs))


def _mlflow_runs(tracking: str, name: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    return client.search_runs([experiment.experiment_id], max_results=1000)


def _settled(study: optuna.Study, budget: int) -> list[optuna.trial.FrozenTrial]:
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(len(trials)))  # unique, gap-free numbers
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert budget_used(study) == budget
    return trials


@pytest.mark.postgres
@pytest.mark.slow
def test_three_machines_share_one_study_and_survive_a_kill(tmp_path: Path, pg_url: str, mlflow_server: str,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"scale-{secrets.token_hex(3)}"
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    roots = [tmp_path / f"machine-{i}" for i in range(3)]

    # 1. Three workers, started together on a study that does not exist yet: exactly 9 trials between them.
    codes, texts, _ = _run_workers(tmp_path, "a", [_argv(r, space, pg_url, mlflow_server, name, 9) for r in roots])
    assert codes == [0, 0, 0], [t[-3000:] for t in texts]
    for text in texts:
        assert "Traceback" not in text, text[-3000:]
    study = load(pg_url, name)
    trials = _settled(study, budget=9)
    assert len(trials) == 9 and not [t.number for t in trials if t.state == TrialState.FAIL]
    assert len({t.user_attrs["worker"]["host"] for t in trials}) >= 2  # the workers really shared the work
    # The teacher was trained once, by one worker; the two others fetched it (verified) instead of training.
    assert sum(text.count("trained in") for text in texts) == 1, texts
    assert sum(text.count("fetched the study's teacher from MLflow run") for text in texts) == 2, texts
    teacher = study.user_attrs["teacher_artifact"]
    assert teacher["run_id"] == study.user_attrs["mlflow_parent_run_id"]
    assert len({(r / "teachers" / teacher["entry"] / "model.safetensors").read_bytes() for r in roots}) == 1
    assert study.user_attrs["latency_device"]
    # One architecture in the space: measured by one machine, and that measurement used by all (comparable).
    assert len({t.user_attrs["latency"]["median_ms"] for t in trials}) == 1
    # MLflow: one parent run, every trial's run under it.
    runs = _mlflow_runs(mlflow_server, name)
    parents = [r for r in runs if r.data.tags.get("autokd.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.run_id == study.user_attrs["mlflow_parent_run_id"]
    children = {int(r.data.tags["autokd.trial"]): r for r in runs if "autokd.trial" in r.data.tags}
    assert sorted(children) == list(range(9))
    assert {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {parents[0].info.run_id}
    assert sum("report:" in text for text in texts) == 1  # one worker wrote the report

    # 2. Top up to 12 with three workers again, one of them killed with kill -9 in the middle of a trial:
    # its trial is failed when its heartbeats stop, queued again, and the two others finish the budget.
    # (The victim starts first so that it surely holds a trial when it is killed; see _run_workers.)
    argvs = [_argv(r, space, pg_url, mlflow_server, name, 12, "--no-prune") for r in roots]
    codes, texts, killed = _run_workers(tmp_path, "b", argvs, kill={"worker": 1}, url=pg_url, name=name)
    assert codes[0] == 0 and codes[2] == 0 and codes[1] == -signal.SIGKILL, [t[-3000:] for t in texts]
    assert sum(text.count("trained in") for text in texts) == 0  # every machine has the teacher by now
    study = load(pg_url, name)
    trials = _settled(study, budget=12)
    dead = trials[killed.number]
    assert dead.state == TrialState.FAIL and dead.user_attrs[REQUEUED_ATTR]
    assert dead.user_attrs["autokd_state"] == "INTERRUPTED" and "no heartbeat" in dead.user_attrs["fail_reason"]
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params and retries[0].state == TrialState.COMPLETE
    assert retries[0].user_attrs["worker"]["host"] != "machine-1"
    assert any("no heartbeat from its worker" in text for text in texts)
    runs = _mlflow_runs(mlflow_server, name)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    statuses = {int(r.data.tags["autokd.trial"]): r.info.status for r in runs if "autokd.trial" in r.data.tags}
    assert statuses[killed.number] == "KILLED"

    # 3. A worker that would time students on another kind of device is refused (exit 2).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    study.set_user_attr("latency_device", "nvidia-h100-80gb-hbm3")
    assert main(_argv(roots[0], space, pg_url, mlflow_server, name, 13)) == 2
    err = capsys.readouterr().err
    assert "nvidia-h100-80gb-hbm3" in err and "--allow-mixed-latency" in err and "not comparable" in err, err
    assert len(load(pg_url, name).trials) == len(trials)


class _Study:
    """The part of optuna.Study that check_latency_device uses."""

    study_name = "s"

    def __init__(self) -> None:
        self.user_attrs: dict[str, Any] = {}

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value


def test_latency_device_is_pinned_and_mixing_needs_the_flag(caplog: pytest.LogCaptureFixture) -> None:
    from autokd.errors import UserError
    from autokd.latency.pinning import check_latency_device

    caplog.set_level(logging.INFO, logger="autokd")
    study = _Study()
    check_latency_device(study, "cpu-amd-epyc-t1", 1, allow_mixed=False)
    assert study.user_attrs == {"latency_device": "cpu-amd-epyc-t1", "latency_batch": 1}
    check_latency_device(study, "cpu-amd-epyc-t1", 1, allow_mixed=False)  # same kind: joins
    for sig, batch in (("nvidia-h100-80gb-hbm3", 1), ("cpu-amd-epyc-t4", 1), ("cpu-amd-epyc-t1", 8)):
        with pytest.raises(UserError, match="not comparable in one Pareto front"):
            check_latency_device(study, sig, batch, allow_mixed=False)
    assert not caplog.messages
    check_latency_device(study, "nvidia-h100-80gb-hbm3", 1, allow_mixed=True)
    assert study.user_attrs["latency_mixed"] is True and "--allow-mixed-latency" in caplog.messages[0]
    assert study.user_attrs["latency_device"] == "cpu-amd-epyc-t1"  # the study's device stays what it was



def test_latency_precision_is_never_mixed() -> None:
    # One precision per study, also with --allow-mixed-latency.
    from autokd.errors import UserError
    from autokd.latency.pinning import check_latency_device

    base = {"device": "cpu:AMD EPYC", "runtime": "onnxruntime", "threads": 1, "batch": 1}
    fp32 = _Study()
    check_latency_device(fp32, "cpu-t1-onnxruntime-fp32", 1, allow_mixed=False, settings={**base, "precision": "fp32"})
    check_latency_device(fp32, "cpu-t1-onnxruntime-fp32", 1, allow_mixed=False, settings={**base, "precision": "fp32"})
    for allow in (False, True):
        with pytest.raises(UserError, match=r"times its students' fp32 ONNX models.*"
                                            r"resume it with --latency-precision fp32"):
            check_latency_device(fp32, "cpu-t1-onnxruntime-int8", 1, allow_mixed=allow,
                                 settings={**base, "precision": "int8"})
    int8 = _Study()
    check_latency_device(int8, "cpu-t1-onnxruntime-int8", 1, allow_mixed=False, settings={**base, "precision": "int8"})
    with pytest.raises(UserError, match="latency precision int8.*--latency-precision int8"):
        check_latency_device(int8, "cpu-t1-onnxruntime-fp32", 1, allow_mixed=True,
                             settings={**base, "precision": "fp32"})
    assert "latency_mixed" not in fp32.user_attrs and "latency_mixed" not in int8.user_attrs

def test_workers_prints_one_line_per_machine(capsys: pytest.CaptureFixture[str]) -> None:
    url, tracking = "postgresql://ml@db.lan:5433/autokd", "http://mlflow.lan:5000"
    assert main(["workers", "--machines", "3", "--storage", url, "--tracking-uri", tracking, "--study", "c10",
                 "--budget", "60", "--", "--dataset", "cifar10"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("autokd search")]
    assert len(lines) == 3
    assert all(f"--storage {url} --tracking-uri {tracking} --study c10 --budget 60 --dataset cifar10" in line
               for line in lines)
    assert "mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri postgresql://ml@db.lan:5433/mlflow " \
           "--artifacts-destination" in out
    assert "createdb -h db.lan -p 5433 -U ml autokd" in out
    assert main(["workers", "--storage", "studies/optuna.journal"]) == 2
    assert "postgresql://" in capsys.readouterr().err

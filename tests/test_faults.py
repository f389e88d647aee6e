"""Faults and bad input: a study survives crashes, OOM, NaN and bad files, and loses nothing.

Process faults are real: `python -m autokd.cli search` runs in a subprocess and gets a real SIGKILL/SIGTERM
while the Optuna journal shows one of its trials training. Faults inside a trial (OOM, NaN, exceptions) come
from a test-only student family whose model misbehaves in training mode; disk-full is an `OSError(ENOSPC)`
from the checkpoint writer (the tests run as root, where a read-only directory does not stop writes).
Resumes run the same command again, in-process through `autokd.cli.main` (a fresh interpreter costs more
than the resume itself). That a SIGTERM leaves the trial's MLflow run KILLED is also covered, against both
stores, by tests/test_mlflow_e2e.py::test_sigterm_leaves_runs_killed.
"""
from __future__ import annotations

import errno
import gc
import hashlib
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
import pytest
import torch
from conftest import repo_pythonpath
from optuna.trial import FrozenTrial, TrialState
from test_search import TINY_SPACE, settings
from torch import nn

from autokd.cli import main
from autokd.model import checkpoint, students
from autokd.search import objective
from autokd.search import run as search
from autokd.search.run import run_search
from autokd.search.worker_loop import MAX_CONSECUTIVE_FAILURES
from autokd.study.store import budget_used, make_storage
from autokd.tracking import default_tracking_uri
from autokd.utils import atomic

pytestmark = pytest.mark.faults

# Trials long enough (5 epochs, no pruning) that a poller surely sees one training before it finishes.
LONG_SPACE = TINY_SPACE.replace("epochs: 4", "epochs: 5")
SHORT_SPACE = TINY_SPACE.replace("epochs: 4", "epochs: 2")


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process searches set torch's thread count from OMP_NUM_THREADS; oversubscribing 2 shared cores
    # makes tiny models an order of magnitude slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture()
def no_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the end-of-search report (seconds per search) where it is not what the test is about."""
    monkeypatch.setattr(search, "_final_report", lambda *args, **kwargs: [])


def write_space(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def cli_argv(root: Path, space: Path, tiny_teacher: tuple[str, Path], *extra: str) -> list[str]:
    arch, ckpt = tiny_teacher
    return ["--root", str(root), "search", "--space", str(space), "--teacher", arch, "--teacher-checkpoint",
            str(ckpt), "--train-limit", "160", "--device", "cpu", "--sampler", "random", "--seed", "3", *extra]


def start_search(argv: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo_pythonpath(), AUTOKD_STUDIES=argv[1])
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "autokd.cli", *argv], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def wait_for_trials(proc: subprocess.Popen, root: Path, name: str, log: Path,
                    ready: Callable[[list[FrozenTrial]], Any], timeout: float = 240) -> Any:
    """Poll the study's journal until `ready(trials)` returns something truthy; return that."""
    storage = make_storage(None, root)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"search exited early with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        except KeyError:
            trials = []
        found = ready(trials)
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"the trials never reached the awaited state within {timeout} s:\n{log.read_text()[-3000:]}")


def training(number: int) -> Callable[[list[FrozenTrial]], FrozenTrial | None]:
    """Ready when trial `number` is RUNNING and has finished at least one epoch (and earlier trials are done)."""
    def ready(trials: list[FrozenTrial]) -> FrozenTrial | None:
        if len(trials) <= number or any(not t.state.is_finished() for t in trials[:number]):
            return None
        t = trials[number]
        return t if t.state == TrialState.RUNNING and len(t.user_attrs.get("curve", [])) >= 1 else None
    return ready


def load(root: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=make_storage(None, root))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_sha(folder: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(folder.iterdir())}


def snapshot(t: FrozenTrial) -> tuple:
    attrs = {k: v for k, v in t.user_attrs.items()}
    return t.number, t.state, t.values, t.params, attrs, t.datetime_complete


def assert_settled(study: optuna.Study, budget: int) -> None:
    """Nothing left RUNNING or queued, exactly `budget` trials counting, every value finite."""
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(len(trials)))  # unique, gap-free numbers
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert budget_used(study) == budget
    for t in trials:
        assert t.values is None or all(math.isfinite(v) for v in t.values), (t.number, t.values)


def mlflow_runs(root: Path, study_name: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=default_tracking_uri(root))
    experiment = client.get_experiment_by_name(study_name)
    assert experiment is not None
    return client.search_runs([experiment.experiment_id], max_results=1000)


def trial_runs(runs: list[Any]) -> dict[int, Any]:
    return {int(r.data.tags["autokd.trial"]): r for r in runs if "autokd.trial" in r.data.tags}


# ----------------------------------------------------------------------------------------------------------
# kill -9 and SIGTERM of a real search process
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill9_mid_trial_then_same_command_loses_nothing(tmp_path: Path, tiny_teacher: tuple[str, Path],
                                                         no_report: None, capsys: pytest.CaptureFixture[str]) -> None:
    root, name = tmp_path / "studies", "kill9"
    space = write_space(tmp_path, LONG_SPACE)
    # Budget 2 and the kill in the last slot: the retry must still run although the killed trial finished.
    argv = cli_argv(root, space, tiny_teacher, "--budget", "2", "--study", name, "--no-prune")  # local MLflow
    log = tmp_path / "first.log"
    proc = start_search(argv, tmp_path, log)
    try:
        killed = wait_for_trials(proc, root, name, log, training(1))
        done = load(root, name).trials[0]
        assert done.state == TrialState.COMPLETE
        before = snapshot(done)
        ckpt = root / name / "trials" / "0"
        ckpt_before = files_sha(ckpt)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        stop(proc)
    assert trial_runs(mlflow_runs(root, name))[1].info.status == "RUNNING"  # what the crash left behind

    assert main(argv) == 0, capsys.readouterr().err  # the same command again
    study = load(root, name)
    trials = study.trials
    assert len(trials) == 3
    dead = trials[1]
    assert dead.state == TrialState.FAIL and dead.user_attrs["autokd_state"] == "INTERRUPTED"
    assert "worker died" in dead.user_attrs["fail_reason"]
    assert dead.params == killed.params
    retry = trials[2]
    assert retry.user_attrs["retry_of"] == 1 and retry.params == killed.params
    assert retry.state == TrialState.COMPLETE
    assert_settled(study, budget=2)
    # The finished trial is untouched: values, params, attributes and checkpoint files.
    assert snapshot(trials[0]) == before
    after = files_sha(ckpt)  # a report may add its test-accuracy cache next to the checkpoint: not a change
    assert {k: after.get(k) for k in ckpt_before} == ckpt_before and {"model.safetensors", "config.json"} <= set(after)
    # MLflow: nothing left RUNNING; the killed trial's run is KILLED, the others FINISHED.
    runs = mlflow_runs(root, name)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    statuses = {n: r.info.status for n, r in trial_runs(runs).items()}
    assert statuses == {0: "FINISHED", 1: "KILLED", 2: "FINISHED"}


@pytest.mark.slow
def test_sigterm_exits_130_promptly_and_resumes(tmp_path: Path, tiny_teacher: tuple[str, Path], no_report: None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    root, name = tmp_path / "studies", "sigterm"
    space = write_space(tmp_path, LONG_SPACE)
    argv = cli_argv(root, space, tiny_teacher, "--budget", "2", "--study", name, "--no-prune", "--no-mlflow")
    log = tmp_path / "first.log"
    proc = start_search(argv, tmp_path, log)
    try:
        running = wait_for_trials(proc, root, name, log, training(0))
        os.kill(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        stop(proc)
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert elapsed < 15, f"took {elapsed:.1f} s to stop after SIGTERM"
    assert "terminated" in text and "rerun the same command" in text
    study = load(root, name)
    trial = study.trials[0]
    assert trial.state == TrialState.FAIL and trial.user_attrs["autokd_state"] == "INTERRUPTED"
    assert "interrupted" in trial.user_attrs["fail_reason"]
    assert budget_used(study) == 0  # an interrupted trial does not use up the budget

    assert main(argv) == 0, capsys.readouterr().err
    study = load(root, name)
    assert [t.user_attrs.get("retry_of") for t in study.trials] == [None, 0, None]
    assert study.trials[1].params == running.params and study.trials[1].state == TrialState.COMPLETE
    assert_settled(study, budget=2)


def test_a_retry_whose_worker_dies_again_is_not_retried_forever(tmp_path: Path) -> None:
    from autokd.study.record import REQUEUED_ATTR
    from autokd.study.store import reap_dead_trials, worker_identity

    study = optuna.create_study(study_name="reap", storage=make_storage(None, tmp_path),
                                directions=["maximize", "minimize"])
    # A pid that is alive but is not the worker (its start time differs): a reused pid counts as dead.
    dead = {"host": socket.gethostname(), "pid": os.getpid(), "start": "not-this-process"}

    def start(worker: dict[str, Any]) -> optuna.Trial:
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.set_user_attr("worker", worker)
        return trial

    first = start(dead)
    assert reap_dead_trials(study) == [0]
    assert budget_used(study) == 0  # its retry takes its place
    retry = start(dead)  # the queued retry, whose worker dies as well (e.g. the kernel's OOM killer)
    assert study.trials[1].user_attrs["retry_of"] == 0 and retry.params == first.params
    alive = start(worker_identity())
    assert reap_dead_trials(study) == [1]  # the live worker's trial is left alone
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING]
    assert trials[0].user_attrs[REQUEUED_ATTR] and REQUEUED_ATTR not in trials[1].user_attrs
    assert "not queued again" in trials[1].user_attrs["fail_reason"]
    assert budget_used(study) == 2 and alive.number == 2
    assert not study.get_trials(states=(TrialState.WAITING,))


@pytest.mark.slow
def test_two_workers_share_one_local_study(tmp_path: Path, tiny_teacher: tuple[str, Path]) -> None:
    root, name = tmp_path / "studies", "pair"
    space = write_space(tmp_path, TINY_SPACE)
    argv = cli_argv(root, space, tiny_teacher, "--budget", "6", "--study", name)  # local MLflow (SQLite) too
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    procs = [start_search(argv, tmp_path, log) for log in logs]
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            stop(p)
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], [t[-3000:] for t in texts]
    for text in texts:
        assert "database is locked" not in text and "Traceback" not in text, text[-3000:]
    study = load(root, name)
    trials = study.trials
    assert len(trials) == 6
    assert_settled(study, budget=6)
    assert not [t.number for t in trials if t.state == TrialState.FAIL]
    assert {t.user_attrs["worker"]["pid"] for t in trials} == {p.pid for p in procs}  # both really worked
    assert len(optuna.get_all_study_summaries(make_storage(None, root))) == 1
    runs = mlflow_runs(root, name)
    assert sorted(trial_runs(runs)) == list(range(6))
    assert len([r for r in runs if r.data.tags.get("autokd.role") == "parent"]) == 1
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_jobs_2_on_one_machine_split_the_cores(tmp_path: Path, tiny_teacher: tuple[str, Path]) -> None:
    """`--jobs 2`: the command spawns a second worker; together they finish exactly the budget, each with its
    share of the cores (a spawned worker once took all of them: 3 training threads on 2 cores)."""
    root, name = tmp_path / "studies", "jobs2"
    space = write_space(tmp_path, TINY_SPACE)
    argv = cli_argv(root, space, tiny_teacher, "--budget", "6", "--study", name, "--jobs", "2", "--no-mlflow")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the split is autokd's to make
    env.update(PYTHONPATH=repo_pythonpath(), AUTOKD_STUDIES=str(root))
    done = subprocess.run([sys.executable, "-m", "autokd.cli", *argv], cwd=tmp_path, env=env, timeout=400,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    share = max(1, (os.cpu_count() or 1) // 2)
    for index in (0, 1):
        assert f"worker {index} of 2: {share} training thread(s)" in done.stdout, done.stdout[-3000:]
    study = load(root, name)
    assert len(study.trials) == 6
    assert_settled(study, budget=6)
    # Whoever claimed them (the spawned worker may start after the tiny trials are gone; sharing one study
    # between two busy workers is test_two_workers_share_one_local_study's job), trials ran on their share.
    assert {t.user_attrs["worker"]["threads"] for t in study.trials} == {share}


# ----------------------------------------------------------------------------------------------------------
# faults inside a trial: OOM, NaN, any exception
# ----------------------------------------------------------------------------------------------------------

FAULTY_MODEL = "autokd_test_faulty"
_faulty_models: list[weakref.ref] = []


class FaultyNet(nn.Module):
    """A tiny classifier that misbehaves once it trains: OOM, NaN logits from its 2nd step, or a ValueError."""

    def __init__(self, fault: str, num_classes: int = 10, in_chans: int = 1, **_: Any) -> None:
        super().__init__()
        self.fault = fault
        self.calls = 0
        self.num_features = 8
        self.conv = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)
        self.register_buffer("ballast", torch.zeros(1 << 18))  # 1 MiB that must be freed after the fault
        _faulty_models.append(weakref.ref(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.conv(x).mean(dim=(2, 3)))
        if not self.training:  # latency measurement and validation work
            return logits
        self.calls += 1
        if self.fault == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated by the test)")
        if self.fault == "nan" and self.calls >= 2:
            return logits * float("nan")
        if self.fault == "boom":
            raise ValueError("boom: the student's forward is broken")
        return logits


def _faulty_entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return FaultyNet(**kwargs)


@pytest.fixture()
def faulty_family() -> Iterator[Callable[[str], str]]:
    """register(fault) -> family name: a student family (registered only for this test) that fails that way."""
    import timm
    from timm.models import register_model

    if not timm.is_model(FAULTY_MODEL):
        _faulty_entry.__name__ = FAULTY_MODEL
        register_model(_faulty_entry)
    added: list[str] = []

    def register(fault: str) -> str:
        name = f"{fault}net"
        students.register_family(name)(lambda width, depth, input_size: (FAULTY_MODEL, {"fault": fault}))
        added.append(name)
        return name

    yield register
    for name in added:
        students._families.pop(name, None)  # noqa: SLF001 - keep the registry as other tests expect it


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("oom", "oom"),
        ("nan", "nonfinite: non-finite training loss at epoch 1, step 2 of"),
        ("boom", "error: ValueError: boom: the student's forward is broken"),
    ],
)
def test_trial_fault_fails_that_trial_and_the_study_goes_on(
        tmp_path: Path, tiny_teacher: tuple[str, Path], faulty_family: Callable[[str], str],
        monkeypatch: pytest.MonkeyPatch, no_report: None, fault: str, reason: str) -> None:
    family = faulty_family(fault)
    space = write_space(tmp_path, SHORT_SPACE.replace("families: [resnet]", f"families: [{family}, resnet]"))
    # The faulty model must be gone (memory released) by the time the next trial builds its student.
    faulty_alive_at_build: list[int] = []
    real_build = objective.build_from_spec

    def build(spec: Any) -> nn.Module:
        gc.collect()
        faulty_alive_at_build.append(sum(ref() is not None for ref in _faulty_models))
        return real_build(spec)

    monkeypatch.setattr(objective, "build_from_spec", build)
    _faulty_models.clear()
    mlflow = fault == "boom"  # the traceback goes to the MLflow run as well
    s = settings(tmp_path, tiny_teacher, space, budget=3, seed=4, study=f"fault-{fault}", mlflow=mlflow)
    summary = run_search(s)

    study = load(tmp_path / "studies", s.study)
    trials = study.trials
    assert [t.params["family"] for t in trials] == [family, "resnet", "resnet"]  # seed 4 draws the fault first
    bad = trials[0]
    assert bad.state == TrialState.FAIL and bad.values is None
    assert bad.user_attrs["fail_reason"].startswith(reason), bad.user_attrs["fail_reason"]
    assert summary.outcomes[0].reason == bad.user_attrs["fail_reason"]
    assert "Traceback (most recent call last)" in bad.user_attrs["traceback"]
    assert ("train.py" if fault == "nan" else "test_faults.py") in bad.user_attrs["traceback"]  # where it raised
    assert {t.user_attrs["autokd_state"] for t in trials[1:]} <= {"COMPLETE", "PRUNED"}
    assert trials[1].user_attrs["curve"]  # the next trial really trained
    assert_settled(study, budget=3)
    assert _faulty_models and all(ref() is None for ref in _faulty_models)
    assert faulty_alive_at_build[1:] == [0, 0], faulty_alive_at_build
    if mlflow:
        runs = trial_runs(mlflow_runs(tmp_path / "studies", s.study))
        failed = runs[0]
        assert failed.info.status == "FAILED"
        assert "ValueError: boom" in failed.data.tags["autokd.traceback"]
        assert failed.data.tags["autokd.fail_reason"] == bad.user_attrs["fail_reason"]
        assert {runs[n].info.status for n in (1, 2)} == {"FINISHED"}


def test_every_trial_failing_stops_the_search_with_exit_1(
        tmp_path: Path, tiny_teacher: tuple[str, Path], faulty_family: Callable[[str], str],
        capsys: pytest.CaptureFixture[str]) -> None:
    family = faulty_family("boom")
    space = write_space(tmp_path, SHORT_SPACE.replace("families: [resnet]", f"families: [{family}]"))
    root = tmp_path / "studies"
    code = main(cli_argv(root, space, tiny_teacher, "--budget", "20", "--study", "doomed", "--no-mlflow"))
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"the last {MAX_CONSECUTIVE_FAILURES} trials all failed" in err and "ValueError: boom" in err
    assert "rerun the same command" in err
    trials = load(root, "doomed").trials
    assert len(trials) == MAX_CONSECUTIVE_FAILURES  # the budget of 20 was not burnt
    assert all(t.state == TrialState.FAIL for t in trials)


def test_a_search_whose_trials_all_failed_under_the_stop_limit_exits_1_with_the_reasons(
        tmp_path: Path, tiny_teacher: tuple[str, Path], faulty_family: Callable[[str], str],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Fewer trials than MAX_CONSECUTIVE_FAILURES, all failed: no front, no student, so no success and no hint
    to export one."""
    family = faulty_family("boom")
    space = write_space(tmp_path, SHORT_SPACE.replace("families: [resnet]", f"families: [{family}]"))
    root = tmp_path / "studies"
    code = main(cli_argv(root, space, tiny_teacher, "--budget", "2", "--study", "doomed2", "--no-mlflow"))
    out, err = capsys.readouterr()
    assert code == 1, err
    assert "no completed trial: study 'doomed2' used its budget (2/2 trials)" in err
    assert "  2 FAIL: error: ValueError: boom: the student's forward is broken" in err
    assert "done:" not in out and "next:" not in out and "export" not in out
    assert [t.state for t in load(root, "doomed2").trials] == [TrialState.FAIL, TrialState.FAIL]


def test_a_search_whose_trials_were_all_infeasible_exits_1_with_the_counts(
        tmp_path: Path, tiny_teacher: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    space = write_space(tmp_path, SHORT_SPACE)  # one architecture: its latency, and so the reason, repeats
    root = tmp_path / "studies"
    code = main(cli_argv(root, space, tiny_teacher, "--budget", "2", "--study", "tooslow", "--no-mlflow",
                         "--max-latency-ms", "0.000001"))
    out, err = capsys.readouterr()
    assert code == 1, err
    assert "no completed trial: study 'tooslow' used its budget (2/2 trials)" in err
    assert "  2 INFEASIBLE: latency " in err and "> --max-latency-ms 1e-06" in err
    assert "done:" not in out and "export" not in out


# ----------------------------------------------------------------------------------------------------------
# disk full while saving a checkpoint
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              where: str) -> None:
    target = tmp_path / "config.json"
    checkpoint.atomic_write_bytes(target, b'{"old": true}\n')
    new = b"x" * 200_000

    def no_space(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "write":  # a real short write: the kernel refuses bytes past RLIMIT_FSIZE (EFBIG)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, hard))
        try:
            with pytest.raises(OSError) as info:
                checkpoint.atomic_write_bytes(target, new)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old_handler)
        assert info.value.errno == errno.EFBIG
    else:
        monkeypatch.setattr(atomic.os, where, no_space)
        with pytest.raises(OSError, match="No space left"):
            checkpoint.atomic_write_bytes(target, new)
        monkeypatch.undo()
    assert target.read_bytes() == b'{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temp file left behind


def test_disk_full_while_saving_stops_the_search_and_keeps_checkpoints(
        tmp_path: Path, tiny_teacher: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, no_report: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    root, name = tmp_path / "studies", "full"
    space = write_space(tmp_path, SHORT_SPACE)
    argv = cli_argv(root, space, tiny_teacher, "--budget", "3", "--study", name, "--no-mlflow", "--no-prune")
    trials_dir = root / name / "trials"
    real_save = checkpoint.save_file
    previous: dict[str, str] = {}

    def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        if not (trials_dir / "0" / checkpoint.CONFIG_FILE).is_file():
            return real_save(tensors, filename, metadata=metadata)
        previous.update(files_sha(trials_dir / "0"))
        Path(filename).write_bytes(b"\0" * 1000)  # the disk fills up half-way through the file
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "cannot write the checkpoint of trial 1" in err and "No space left on device" in err, err
    assert "Free disk space" in err
    study = load(root, name)
    # Stopped at once; the trial that could not be saved is queued to run again on the next start.
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert "No space left" in study.trials[1].user_attrs["fail_reason"]
    assert budget_used(study) == 1
    # The finished trial's checkpoint is complete and unchanged; no torn or temp file anywhere.
    assert previous and files_sha(trials_dir / "0") == previous
    state, config = checkpoint.read_checkpoint(trials_dir / "0")
    assert config["trial"] == 0 and state
    assert not list((trials_dir / "1").glob("*")) and not list(trials_dir.glob("*/.*.tmp"))

    monkeypatch.setattr(checkpoint, "save_file", real_save)  # space freed: the same command resumes
    assert main(argv) == 0, capsys.readouterr().err
    study = load(root, name)
    assert study.trials[2].user_attrs["retry_of"] == 1
    assert study.trials[2].params == study.trials[1].params
    assert_settled(study, budget=3)
    assert files_sha(trials_dir / "0") == previous
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            checkpoint.read_checkpoint(trials_dir / str(t.number))


# ----------------------------------------------------------------------------------------------------------
# a torn last line of the Optuna journal (kill -9 or a full disk mid-append)
# ----------------------------------------------------------------------------------------------------------

def tear_journal(journal: Path, how: str) -> bytes:
    """Leave the journal as a write cut short leaves it; returns the torn bytes now at its end."""
    data = journal.read_bytes()
    if how == "half-written line":  # a process killed while it appended a line
        torn = b'{"op_code":8,"worker_id":"w","trial_id":1,"user_attr":{"curve":[0.5,0.'
        journal.write_bytes(data + torn)
        return torn
    last = data[data.rindex(b"\n", 0, len(data) - 1) + 1:]  # the last line's write stopped before its end
    assert json.loads(last).get("op_code") in STUDY_ATTR_OPS, last  # a write no finished trial depends on
    journal.write_bytes(data[:len(data) - len(last) // 2])
    return last[:len(last) - len(last) // 2]


# Optuna's journal op codes that set a study attribute (the last writes of a search).
STUDY_ATTR_OPS = (2, 3)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["half-written line", "last line cut short"])
def test_a_torn_journal_line_then_the_same_command_keeps_every_trial_and_report_and_export_work(
        tmp_path: Path, tiny_teacher: tuple[str, Path], capsys: pytest.CaptureFixture[str], how: str) -> None:
    root, name = tmp_path / "studies", "torn"
    space = write_space(tmp_path, SHORT_SPACE)
    argv = cli_argv(root, space, tiny_teacher, "--study", name, "--no-prune")  # local MLflow store
    assert main([*argv, "--budget", "2"]) == 0, capsys.readouterr().err
    before = [snapshot(t) for t in load(root, name).trials]
    journal = root / "optuna.journal"
    torn = tear_journal(journal, how)
    capsys.readouterr()

    assert main([*argv, "--budget", "3"]) == 0, capsys.readouterr().err  # the same command, one more trial
    out, err = capsys.readouterr()
    [kept] = root.glob("optuna.journal.torn-*")
    assert kept.read_bytes() == torn
    assert (out + err).count("torn last line") == 1 and str(kept) in out, out + err
    assert "Traceback" not in out + err
    study = load(root, name)
    assert [snapshot(t) for t in study.trials[:2]] == before  # every finished trial kept, untouched
    assert_settled(study, budget=3)

    # `report` and `export` open the journal too: a line torn again is cut again, and they work.
    tear_journal(journal, "half-written line")
    assert main(["--root", str(root), "report", "--study", name]) == 0, capsys.readouterr().err
    assert (root / name / "report" / "front.csv").is_file()
    out_dir = tmp_path / "student"
    assert main(["--root", str(root), "export", "--study", name, "--pick", "knee", "--format", "safetensors",
                 "--out", str(out_dir)]) == 0, capsys.readouterr().err
    assert (out_dir / "model.safetensors").is_file()
    assert len(list(root.glob("optuna.journal.torn-*"))) == 2
    assert [snapshot(t) for t in load(root, name).trials[:2]] == before
    runs = mlflow_runs(root, name)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_a_search_that_cannot_read_its_storage_ends_its_mlflow_parent_run(
        tmp_path: Path, tiny_teacher: tuple[str, Path], no_report: None) -> None:
    """A journal broken in its middle (not a torn last line: a whole line of garbage that another program wrote,
    followed by Optuna's next write) stops the search with its error; its MLflow parent run is not left RUNNING."""
    name = "broken"
    root = tmp_path / "studies"

    def break_journal(outcome: Any, progress: Any) -> None:
        with open(root / "optuna.journal", "ab") as f:
            f.write(b"not a journal line\n")

    with pytest.raises(ValueError):  # json.JSONDecodeError from Optuna's reader
        run_search(settings(tmp_path, tiny_teacher, write_space(tmp_path, SHORT_SPACE), budget=3, study=name,
                            mlflow=True, prune=False), on_trial=break_journal)
    parents = [r for r in mlflow_runs(root, name) if "autokd.trial" not in r.data.tags]
    assert [r.info.status for r in parents] == ["FAILED"]
    assert not [r.info.run_name for r in mlflow_runs(root, name) if r.info.status == "RUNNING"]


# ----------------------------------------------------------------------------------------------------------
# bad input: exit 2 with what is wrong and how to fix it, before any study exists
# ----------------------------------------------------------------------------------------------------------

def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return int(exc.code or 0)


def assert_nothing_created(root: Path) -> None:
    """No study in the storage (the journal file itself may exist: opening the storage creates it), no MLflow."""
    journal = root / "optuna.journal"
    assert not journal.exists() or not optuna.get_all_study_summaries(make_storage(None, root))
    assert not (root / "mlflow.db").exists()


def test_bad_teacher_checkpoint_exits_2_naming_the_file(tmp_path: Path, tiny_teacher: tuple[str, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    arch, ckpt = tiny_teacher
    space = write_space(tmp_path, SHORT_SPACE)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    root = tmp_path / "studies"
    base = ["--root", str(root), "search", "--space", str(space), "--train-limit", "160", "--device", "cpu",
            "--budget", "1"]

    assert run_cli([*base, "--teacher", arch, "--teacher-checkpoint", str(truncated)]) == 2
    err = capsys.readouterr().err
    assert str(truncated) in err and "truncated or corrupt" in err, err
    assert_nothing_created(root)

    # A real checkpoint of another architecture: the error lists what does not fit.
    assert run_cli([*base, "--teacher", "resnet10t", "--teacher-checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "does not fit timm 'resnet10t'" in err, err
    assert "missing keys" in err or "shape mismatch" in err
    assert "--teacher ARCH" in err
    assert_nothing_created(root)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("name: x\nstudents: {families: [resnet]\nlosses: {ce: {}}\n", ["invalid YAML", ":3:"]),
        ("!!python/object/apply:os.system ['touch {pwned}']\n",
         ["Python object tags are not allowed"]),
        ("name: x\nstudents: {families: [resnet]}\nlosses: {ce: {}}\noptimizer: {lrr: 0.1}\n",
         ["optimizer.lrr", "did you mean 'lr'", "valid keys: name, lr, weight_decay"]),
        ("name: x\nepochs: many\nstudents: {families: [resnet]}\nlosses: {ce: {}}\n",
         ["epochs", "must be an integer >= 1", "'many'"]),
        ("name: x\nstudents: {families: [resnet]}\nlosses: {ce: {}}\nbatch_size: [32, 64]\n",
         ["batch_size", "{choices: [...]}", "got list"]),
        ("name: x\nstudents: {families: [resnet], width: {low: 0.5, high: 2, setp: 0.5}}\nlosses: {ce: {}}\n",
         ["students.width", "setp", "did you mean 'step'"]),
    ],
)
def test_bad_space_exits_2_with_file_and_key_path(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  text: str, fragments: list[str]) -> None:
    pwned = tmp_path / "pwned"
    space = write_space(tmp_path, text.replace("{pwned}", str(pwned)), "bad.yaml")
    root = tmp_path / "studies"
    assert run_cli(["--root", str(root), "search", "--space", str(space), "--budget", "1",
                    "--train-limit", "160"]) == 2
    err = capsys.readouterr().err
    assert str(space) in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert not pwned.exists()  # the YAML tag was never executed
    assert_nothing_created(root)


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--dataset", "cifar11"], ["'cifar11'", "Did you mean cifar10", "Valid: digits, cifar10, cifar100"]),
        (["--dataset", "cifar10", "--data-dir", "{empty}"], ["'cifar10'", "{empty}", "pass --download"]),
        (["--dataset", "folder:{empty}/photos"], ["{empty}/photos", "does not exist", "train/ and val/"]),
        (["--teacher", "resnet18x"], ["'resnet18x'", "not a timm model name", "close matches: resnet18"]),
    ],
)
def test_bad_data_or_teacher_exits_2_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  argv: list[str], fragments: list[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    root = tmp_path / "studies"
    argv = [a.replace("{empty}", str(empty)) for a in argv]
    assert run_cli(["--root", str(root), "search", "--budget", "1", "--train-limit", "160", *argv]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment.replace("{empty}", str(empty)) in err, err
    assert_nothing_created(root)
    assert not any(empty.iterdir())  # nothing downloaded or written into the data dir


def test_resume_with_other_data_is_refused(tmp_path: Path, tiny_teacher: tuple[str, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    root, name = tmp_path / "studies", "pinned"
    space = write_space(tmp_path, SHORT_SPACE)
    argv = cli_argv(root, space, tiny_teacher, "--budget", "1", "--study", name, "--no-mlflow",
                    "--max-latency-ms", "1e-6")  # INFEASIBLE at once: a trial without training
    assert main(argv) == 1  # the study exists, with no completed trial
    capsys.readouterr()
    for change in (["--train-limit", "120"], ["--input-size", "12"]):
        assert main([*argv, *change, "--budget", "2"]) == 2
        err = capsys.readouterr().err
        assert f"study {name!r} was created with a different dataset" in err, err
        assert "--study NEW_NAME" in err and "train_limit=160" in err and "input_size=16" in err, err
    assert len(load(root, name).trials) == 1


# ----------------------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------------------

def test_same_seed_twice_gives_the_same_trials(tmp_path: Path, tiny_teacher: tuple[str, Path], no_report: None,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    space = write_space(tmp_path, SHORT_SPACE)
    results = []
    for run in ("a", "b"):  # two fresh roots, the same command; the first run's RNG use must not leak
        root = tmp_path / run
        argv = cli_argv(root, space, tiny_teacher, "--budget", "3", "--study", "same", "--no-mlflow", "--no-prune",
                        "--sampler", "tpe")  # the default sampler
        assert main(argv) == 0, capsys.readouterr().err
        trials = load(root, "same").trials
        results.append([(t.params, t.values[0], t.user_attrs["curve"]) for t in trials])
    assert results[0] == results[1]
    assert len({json_key(p) for p, _, _ in results[0]}) == 3  # three different draws, all reproduced


def json_key(params: dict[str, Any]) -> str:
    return repr(sorted(params.items()))

"""The local study storage: Optuna's journal file fsyncs every write, and a crash loses nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from conftest import repo_pythonpath

from autokd.study.store import ask_with_heartbeat, fail_stale_trials, make_storage

DIRECTIONS = ["maximize", "minimize"]


def test_journal_fsyncs_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = optuna.create_study(study_name="s", storage=make_storage(None, tmp_path), directions=DIRECTIONS)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])  # Optuna's too

    trial = study.ask()
    after_ask = len(synced)
    assert after_ask >= 1  # the trial's creation is on disk

    trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    for epoch in range(1, 4):
        trial.set_user_attr("curve", [0.5] * epoch)
    assert len(synced) >= after_ask + 4  # a running trial's writes are fsynced one by one ...

    other = optuna.load_study(study_name="s", storage=make_storage(None, tmp_path))
    [seen] = other.get_trials(deepcopy=False)  # ... but another process reading the journal sees them at once
    assert seen.user_attrs["curve"] == [0.5, 0.5, 0.5] and "lr" in seen.params

    before_tell = len(synced)
    study.tell(trial, [0.9, 1.5])
    assert len(synced) >= before_tell + 1  # the finished trial is fsynced


def test_writes_survive_kill_9(tmp_path: Path) -> None:
    """A worker killed with SIGKILL: its finished trial and its running trial's writes are all in the journal."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import optuna
        from autokd.study.store import make_storage
        study = optuna.create_study(study_name="s", storage=make_storage(None, Path({str(tmp_path)!r})),
                                    directions={DIRECTIONS!r})
        done = study.ask()
        done.suggest_int("depth", 1, 4)
        study.tell(done, [0.75, 2.5])
        trial = study.ask()
        trial.set_user_attr("curve", [0.25, 0.5])
        trial.suggest_int("depth", 1, 4)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=repo_pythonpath()))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    study = optuna.load_study(study_name="s", storage=make_storage(None, tmp_path))
    [done, trial] = study.get_trials(deepcopy=False)
    assert done.state == optuna.trial.TrialState.COMPLETE and done.values == [0.75, 2.5]  # a finished trial
    assert trial.user_attrs["curve"] == [0.25, 0.5] and 1 <= trial.params["depth"] <= 4
    assert trial.state == optuna.trial.TrialState.RUNNING  # the search's reaper fails and requeues it


# --- requeue, reaping and the budget -------------------------------------------------------------------------

def _journal_study(tmp_path: Path) -> optuna.Study:
    return optuna.create_study(study_name="s", storage=make_storage(None, tmp_path), directions=DIRECTIONS)


def _dead_worker() -> dict:
    """The identity of a real worker process that has exited (its pid no longer runs, or is someone else's)."""
    script = "import json; from autokd.study.store import worker_identity; print(json.dumps(worker_identity()))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True,
                          env=dict(os.environ, PYTHONPATH=repo_pythonpath()))
    return json.loads(proc.stdout)


def test_requeue_queues_the_same_params_once_and_the_retry_takes_the_budget_slot(tmp_path: Path) -> None:
    from autokd.study.record import REQUEUED_ATTR, requeue_trial
    from autokd.study.store import budget_used

    study = _journal_study(tmp_path)
    trial = study.ask()
    trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    trial.suggest_int("depth", 1, 4)
    assert budget_used(study) == 1  # a running trial holds its slot
    assert requeue_trial(study, trial) is True
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    first = study.get_trials(deepcopy=False)[0]
    assert first.user_attrs[REQUEUED_ATTR] is True
    assert budget_used(study) == 0  # the interrupted trial gives its slot to its retry

    retry = study.ask()  # the queued parameters come back with the next ask
    retry.suggest_float("lr", 1e-3, 1e-1, log=True)
    retry.suggest_int("depth", 1, 4)
    assert retry.params == first.params and retry.user_attrs["retry_of"] == first.number
    study.tell(retry, [0.9, 1.0])
    assert budget_used(study) == 1


def test_requeue_of_a_trial_without_params_queues_nothing(tmp_path: Path) -> None:
    from autokd.study.record import requeue_trial

    study = _journal_study(tmp_path)
    trial = study.ask()
    assert requeue_trial(study, trial) is False
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))) == 0


def test_budget_counts_finished_and_running_but_not_a_failed_trial_with_a_retry(tmp_path: Path) -> None:
    from autokd.study.store import budget_used

    study = _journal_study(tmp_path)
    done = study.ask()
    study.tell(done, [0.5, 2.0])
    pruned = study.ask()
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    failed = study.ask()
    failed.suggest_int("depth", 1, 4)
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    study.ask()  # running
    assert budget_used(study) == 4
    # A trial that Optuna's own stale check failed cannot be marked requeued; its retry's retry_of says it.
    study.enqueue_trial(failed.params, user_attrs={"retry_of": failed.number})
    study.ask()
    assert budget_used(study) == 4  # the retry took the failed trial's slot


def test_reaper_fails_and_requeues_the_trial_of_a_dead_worker_once(tmp_path: Path) -> None:
    from autokd.study.record import REQUEUED_ATTR
    from autokd.study.store import reap_dead_trials, worker_identity

    study = _journal_study(tmp_path)
    alive = study.ask()
    alive.suggest_int("depth", 1, 4)
    alive.set_user_attr("worker", worker_identity())  # this process: alive, never reaped
    orphan = study.ask()
    orphan.suggest_int("depth", 1, 4)
    orphan.set_user_attr("worker", _dead_worker())

    assert reap_dead_trials(study) == [orphan.number]
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    dead = trials[orphan.number]
    assert dead.state == optuna.trial.TrialState.FAIL and dead.user_attrs[REQUEUED_ATTR] is True
    assert dead.user_attrs["autokd_state"] == "INTERRUPTED" and "worker died" in dead.user_attrs["fail_reason"]
    assert trials[alive.number].state == optuna.trial.TrialState.RUNNING
    [queued] = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert queued.user_attrs["retry_of"] == orphan.number
    assert reap_dead_trials(study) == []  # nothing left to reap

    # The retry's worker dies too: it is failed but not queued a third time (a trial that kills its worker).
    retry = study.ask()
    retry.suggest_int("depth", 1, 4)
    assert retry.params == dead.params and retry.number == queued.number
    retry.set_user_attr("worker", _dead_worker())
    assert reap_dead_trials(study) == [retry.number]
    again = study.get_trials(deepcopy=False)[retry.number]
    assert again.state == optuna.trial.TrialState.FAIL and "not queued again" in again.user_attrs["fail_reason"]
    assert study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)) == []


def test_reaper_leaves_trials_of_workers_on_other_hosts_to_the_heartbeat(tmp_path: Path) -> None:
    from autokd.study.store import reap_dead_trials

    study = _journal_study(tmp_path)
    trial = study.ask()
    trial.suggest_int("depth", 1, 4)
    trial.set_user_attr("worker", {**_dead_worker(), "host": "another-machine"})
    assert reap_dead_trials(study) == []
    assert study.get_trials(deepcopy=False)[0].state == optuna.trial.TrialState.RUNNING


def test_journal_storage_has_no_heartbeat(tmp_path: Path) -> None:
    """Heartbeats are an RDB storage's (tests/test_scaleout.py); on the journal they are a no-op."""
    study = optuna.create_study(study_name="s", storage=make_storage(None, tmp_path), directions=DIRECTIONS)
    trial, beat = ask_with_heartbeat(study)
    beat.join()
    assert fail_stale_trials(study) == [] and trial.number == 0


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning",
                            "ignore:Heartbeat of storage is supposed to be used")
def test_heartbeat_keeps_a_running_trial_fresh_until_joined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On an RDB storage (SQLite here, PostgreSQL in test_scaleout) the worker's heartbeat thread keeps its
    trial from being judged stale; once the thread stops, the trial is failed after the grace period."""
    import time

    from autokd.study.store import HEARTBEAT_GRACE_ENV, HEARTBEAT_INTERVAL_ENV

    monkeypatch.setenv(HEARTBEAT_INTERVAL_ENV, "1")
    monkeypatch.setenv(HEARTBEAT_GRACE_ENV, "2")
    study = optuna.create_study(study_name="s", storage=make_storage(f"sqlite:///{tmp_path / 'hb.db'}", tmp_path),
                                directions=DIRECTIONS)
    trial, beat = ask_with_heartbeat(study)
    trial.suggest_int("depth", 1, 4)
    try:
        time.sleep(3.5)  # longer than the grace period: only the beats keep the trial fresh
        assert fail_stale_trials(study) == []
    finally:
        beat.join()
    time.sleep(3.5)
    assert fail_stale_trials(study) == [trial.number]
    [failed, retry] = study.get_trials(deepcopy=False)
    assert failed.state == optuna.trial.TrialState.FAIL and retry.user_attrs["retry_of"] == trial.number

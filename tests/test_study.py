"""The local study storage: Optuna's journal file fsyncs every write, and a crash loses nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest

from autokd.study import ask_with_heartbeat, fail_stale_trials, make_storage

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
        from autokd.study import make_storage
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
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    study = optuna.load_study(study_name="s", storage=make_storage(None, tmp_path))
    [done, trial] = study.get_trials(deepcopy=False)
    assert done.state == optuna.trial.TrialState.COMPLETE and done.values == [0.75, 2.5]  # a finished trial
    assert trial.user_attrs["curve"] == [0.25, 0.5] and 1 <= trial.params["depth"] <= 4
    assert trial.state == optuna.trial.TrialState.RUNNING  # the search's reaper fails and requeues it


def test_journal_storage_has_no_heartbeat(tmp_path: Path) -> None:
    """Heartbeats are an RDB storage's (tests/test_scaleout.py); on the journal they are a no-op."""
    study = optuna.create_study(study_name="s", storage=make_storage(None, tmp_path), directions=DIRECTIONS)
    trial, beat = ask_with_heartbeat(study)
    beat.join()
    assert fail_stale_trials(study) == [] and trial.number == 0

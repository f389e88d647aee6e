"""Pins the Optuna internals autokd relies on (autokd.optuna_internals): an Optuna upgrade that changes them
fails here first, by name, instead of somewhere in the search."""
from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage

from autokd._internals.optuna import stale_trial_ids, storage_of, trial_id
from autokd.study.store import make_storage

DIRECTIONS = ["maximize", "minimize"]
# Heartbeats outside study.optimize are what the worker loop does (autokd.study.start_heartbeat).
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning",
                                        "ignore:Heartbeat of storage is supposed to be used")


def test_a_study_storage_and_trial_ids_annotate_and_fail_another_process_trial(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="s", storage=make_storage(None, tmp_path), directions=DIRECTIONS)
    running = study.ask()
    other = study.ask()
    # What the reaper does to a dead worker's trial: it holds only a FrozenTrial read back from the storage.
    [frozen] = [t for t in study.get_trials(deepcopy=False) if t.number == other.number]
    storage = storage_of(study)
    assert trial_id(frozen) == trial_id(other) != trial_id(running)
    assert storage.get_trial(trial_id(frozen)).number == other.number
    storage.set_trial_user_attr(trial_id(frozen), "fail_reason", "worker died")
    storage.set_trial_state_values(trial_id(frozen), optuna.trial.TrialState.FAIL)
    again = optuna.load_study(study_name="s", storage=make_storage(None, tmp_path))
    states = {t.number: (t.state, t.user_attrs.get("fail_reason")) for t in again.get_trials(deepcopy=False)}
    assert states == {running.number: (optuna.trial.TrialState.RUNNING, None),
                      other.number: (optuna.trial.TrialState.FAIL, "worker died")}


def test_stale_trial_query_finds_a_trial_whose_heartbeat_stopped(tmp_path: Path) -> None:
    storage = RDBStorage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name="s", storage=storage, directions=DIRECTIONS)
    beating, silent = study.ask(), study.ask()
    heartbeat_storage = storage_of(study)
    heartbeat_storage.record_heartbeat(trial_id(silent))
    time.sleep(2.5)  # past the grace period
    heartbeat_storage.record_heartbeat(trial_id(beating))
    assert stale_trial_ids(heartbeat_storage, study) == [trial_id(silent)]
    study.tell(silent, state=optuna.trial.TrialState.FAIL)
    assert stale_trial_ids(heartbeat_storage, study) == []  # only RUNNING trials are stale

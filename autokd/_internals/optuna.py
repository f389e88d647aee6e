"""The Optuna internals autokd needs where Optuna has no public route, kept in one place.

`tests/test_optuna_internals.py` pins what is relied on, so that an Optuna upgrade fails there first:
- a study's storage and ids: the search annotates and fails the trials of dead workers (other processes),
  which only the storage can do;
- a heartbeat storage's stale-trial query: Optuna's public `optuna.storages.fail_stale_trials` fails a stale
  trial before its callback sees it, when the trial can no longer be annotated or marked requeued.
"""
from __future__ import annotations

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage a study reads and writes (Optuna may wrap the one it was given in a cache)."""
    return study._storage  # noqa: SLF001


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """A trial's id in its storage (not its number)."""
    return trial._trial_id  # noqa: SLF001


def stale_trial_ids(storage: BaseStorage, study: optuna.Study) -> list[int]:
    """Ids of the study's RUNNING trials whose heartbeat is older than the storage's grace period."""
    return storage._get_stale_trial_ids(study._study_id)  # type: ignore[attr-defined]  # noqa: SLF001

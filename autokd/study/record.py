"""The record of a study and its trials: every user-attribute key, its end state, finishing a trial and reading one back.

A trial's end state exists in three stores: Optuna's state (what samplers and optuna-dashboard see), the
``autokd_state`` user attribute (which tells INFEASIBLE from PRUNED and INTERRUPTED from FAIL, both folded
together in Optuna) and the status of its MLflow run. `finish` writes all three in one order; `trial_state`
and `recorded_state` read them back. The attribute names are stored in studies: never change a value.
"""
from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from autokd._internals.optuna import storage_of, trial_id

# Every user-attribute key autokd writes, study and trial. Their values are stored in studies: never change one.

# Study user attributes, written when the study is created (pinned: a resume with other values is refused).
SPACE_FINGERPRINT_ATTR = "space_fingerprint"
DATASET_ATTR = "dataset"
DATA_FINGERPRINT_ATTR = "data_fingerprint"
TEACHER_ATTR = "teacher"  # "<arch>@<fingerprint>" of the teacher the study was created with
EPOCHS_ATTR = "epochs"
PINNED_ATTRS = (SPACE_FINGERPRINT_ATTR, DATASET_ATTR, DATA_FINGERPRINT_ATTR, TEACHER_ATTR, EPOCHS_ATTR)
# ... and recorded beside them (not pinned).
SPACE_ATTR = "space"  # the space, canonical (its ``views`` are the training views)
SPACE_PATH_ATTR = "space_path"
VERSION_ATTR = "autokd_version"
BUDGET_ATTR = "budget"
DEVICE_ATTR = "device"  # the training device of the worker that created the study
INPUT_SIZE_ATTR = "input_size"
TRAIN_LIMIT_ATTR = "train_limit"
DATA_DIR_ATTR = "data_dir"
VAL_IMAGES_ATTR = "val_images"  # size of the validation split, for the accuracy intervals
# The settings behind data_fingerprint, named when a resume with other data is refused.
DATA_SETTINGS = (DATASET_ATTR, INPUT_SIZE_ATTR, TRAIN_LIMIT_ATTR, DATA_DIR_ATTR)
TEACHER_VAL_ACC_ATTR = "teacher_val_acc"
TEACHER_ARTIFACT_ATTR = "teacher_artifact"  # where other machines fetch the teacher from (a shared study)
MLFLOW_PARENT_RUN_ATTR = "mlflow_parent_run_id"
MLFLOW_TRACKING_URI_ATTR = "mlflow_tracking_uri"
WORKERS_STARTED_ATTR = "workers_started"  # how many workers joined, so that each draws its own samples
REPORT_FOR_FINISHED_ATTR = "report_for_finished"  # finished-trial count the last report was written for
# The study's latency device, pinned on first use (autokd.latency.pinning).
LATENCY_DEVICE_ATTR = "latency_device"  # the device signature
LATENCY_BATCH_ATTR = "latency_batch"
LATENCY_SETTINGS_ATTR = "latency_settings"  # the signature as a dict (runtime, version, threads, precision, ...)
LATENCY_RETIME_ATTR = "latency_retime"  # the front's last re-timing (autokd.latency.retiming)
LATENCY_MIXED_ATTR = "latency_mixed"  # the study's trials were timed on several latency devices (allowed explicitly)

# Trial user attributes.
STATE_ATTR = "autokd_state"  # a State value, written by `finish` after the reason: the record is then whole
PARAMS_ATTR = "params"  # the sampled values, flat ({"family": ..., "kd.alpha": ...}): read with `sampled_params`
ARCH_KEY_ATTR = "arch_key"
TIMM_ATTR = "timm"  # {"model_name": ..., "kwargs": {...}}
LATENCY_ATTR = "latency"  # the trial's own latency measurement (a LatencyResult dict plus "cache_hit")
CURVE_ATTR = "curve"  # validation accuracy after each epoch
CHECKPOINT_ATTR = "checkpoint"  # directory of a COMPLETE trial's student
WORKER_ATTR = "worker"  # who runs the trial (host, node, pid, ...), for finding dead workers
FAIL_REASON_ATTR = "fail_reason"
INFEASIBLE_REASON_ATTR = "infeasible_reason"
TRACEBACK_ATTR = "traceback"
PRUNED_AT_EPOCH_ATTR = "pruned_at_epoch"
# An interrupted trial's parameters are queued again: the new trial has RETRY_OF_ATTR (the old number), the
# old one REQUEUED_ATTR, so that its retry, not itself, takes its place in the budget.
RETRY_OF_ATTR = "retry_of"
REQUEUED_ATTR = "requeued"

TRACEBACK_ATTR_CHARS = 8000  # the end of a failed trial's traceback kept in its attributes
TRACEBACK_TAG = "autokd.traceback"  # ... and in its MLflow run's tags (MLflow limits tag values)
TRACEBACK_TAG_CHARS = 4500


class State(str, enum.Enum):
    """autokd's state of a trial. RUNNING is only ever read back; the others are terminal.

    A string (``State.PRUNED == "PRUNED"``) that prints as its value, like ``enum.StrEnum`` (Python 3.11+).
    """

    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"  # stopped at a rung, dominated by its peers
    INFEASIBLE = "INFEASIBLE"  # rejected before training (--max-latency-ms)
    FAIL = "FAIL"
    INTERRUPTED = "INTERRUPTED"  # Ctrl-C, SIGTERM or a dead worker: not the trial's fault, queued again
    RUNNING = "RUNNING"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


TERMINAL_STATES = (State.COMPLETE, State.PRUNED, State.INFEASIBLE, State.FAIL, State.INTERRUPTED)

# The Optuna state a trial is told with: Optuna has no "infeasible" or "interrupted" state.
OPTUNA_STATE: dict[State, TrialState] = {
    State.COMPLETE: TrialState.COMPLETE,
    State.PRUNED: TrialState.PRUNED,
    State.INFEASIBLE: TrialState.PRUNED,
    State.FAIL: TrialState.FAIL,
    State.INTERRUPTED: TrialState.FAIL,
    State.RUNNING: TrialState.RUNNING,
}


# Where a terminal state's reason is stored (a pruned trial's is its PRUNED_AT_EPOCH_ATTR, set at the rung).
_REASON_ATTR: dict[State, str] = {
    State.INFEASIBLE: INFEASIBLE_REASON_ATTR,
    State.FAIL: FAIL_REASON_ATTR,
    State.INTERRUPTED: FAIL_REASON_ATTR,
}


class TrialRun(Protocol):
    """What `finish` needs of a trial's tracker run (`tracking.TrialRun`)."""

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def end(self, state: str, reason: str | None = None) -> None: ...


# ---------------------------------------------------------------------------------------------------------
# Writing


def finish(study: optuna.Study, trial: optuna.Trial, state: State, *, values: Sequence[float] | None = None,
           reason: str | None = None, traceback: str | None = None, requeue: bool = False,
           run: TrialRun | None = None, run_reason: str | None = None) -> None:
    """Record a trial's end everywhere, in this order: attributes, requeue, ``study.tell``, the MLflow run.

    The attributes come first because a told trial can no longer change; the run ends last, so that its
    status never claims more than the study holds. ``reason`` is stored under the state's reason attribute
    (a pruned trial has none) and ends the run, unless ``run_reason`` says otherwise. ``values`` are the
    objectives of a COMPLETE trial. For FAIL and INTERRUPTED the trial is already failing: an error while
    recording it is swallowed (a trial left RUNNING is failed by the reaper on the next start).
    """
    if state not in TERMINAL_STATES:
        raise ValueError(f"not a terminal trial state: {state!r}; expected one of {[s.value for s in TERMINAL_STATES]}")
    if (values is None) == (state == State.COMPLETE):
        raise ValueError(f"a COMPLETE trial is told its values, no other is (state {state.value}, values {values})")
    failing = state in (State.FAIL, State.INTERRUPTED)
    try:
        if reason is not None and state in _REASON_ATTR:
            trial.set_user_attr(_REASON_ATTR[state], reason)
        if traceback:
            trial.set_user_attr(TRACEBACK_ATTR, traceback[-TRACEBACK_ATTR_CHARS:])
        trial.set_user_attr(STATE_ATTR, state.value)
        if requeue:
            requeue_trial(study, trial)
        study.tell(trial, None if values is None else list(values), state=OPTUNA_STATE[state])
    except Exception:  # noqa: BLE001 - a failing trial must not raise again; the reaper fails it if this did not
        if not failing:
            raise
    if run is not None:
        if traceback:
            run.set_tags({TRACEBACK_TAG: traceback[-TRACEBACK_TAG_CHARS:]})
        run.end(state.value, reason if run_reason is None else run_reason)


def queue_retry(study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> None:
    """Queue a trial's parameters again as a new trial that records which one it retries (RETRY_OF_ATTR)."""
    study.enqueue_trial(trial.params, user_attrs={RETRY_OF_ATTR: trial.number}, skip_if_exists=False)


def requeue_trial(study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> bool:
    """Queue an unfinished trial's parameters again (user attribute retry_of) and mark it requeued.

    Call before the trial is told FAIL (a finished trial's attributes cannot change). Returns False when the
    trial had no parameters yet (it died while sampling), so there is nothing to retry.
    """
    if not trial.params:
        return False
    queue_retry(study, trial)
    storage_of(study).set_trial_user_attr(trial_id(trial), REQUEUED_ATTR, True)  # also another worker's trial
    return True


def fail_dead_worker_trial(study: optuna.Study, trial: FrozenTrial, reason: str, retry: bool) -> None:
    """Record the end of a RUNNING trial whose worker died (another process): INTERRUPTED with ``reason``, its
    parameters queued again, Optuna's FAIL; the same record and order as `finish`, written through the storage.

    A trial that was itself a retry is not queued a second time: a trial that kills its worker (the kernel's
    OOM killer, say) would otherwise be retried on every restart and the search would never get past it.
    """
    storage = storage_of(study)  # a FrozenTrial of another process: only its storage can change it
    first = trial.user_attrs.get(RETRY_OF_ATTR)
    if retry and first is not None:
        reason += (f"; not queued again: it was already the retry of trial {first} (a trial whose worker keeps "
                   "dying, e.g. killed by the kernel's OOM killer, is retried once)")
    storage.set_trial_user_attr(trial_id(trial), FAIL_REASON_ATTR, reason)
    storage.set_trial_user_attr(trial_id(trial), STATE_ATTR, State.INTERRUPTED.value)
    if retry and first is None:
        requeue_trial(study, trial)
    storage.set_trial_state_values(trial_id(trial), TrialState.FAIL)


# ---------------------------------------------------------------------------------------------------------
# Reading


def trial_state(trial: FrozenTrial) -> str:
    """autokd's state of a trial for reports: COMPLETE, PRUNED, INFEASIBLE, FAIL (incl. interrupted) or RUNNING.

    Waiting trials read as FAIL: callers that list them check ``trial.state == TrialState.WAITING`` first.
    """
    if trial.state == TrialState.RUNNING:
        return State.RUNNING.value
    if trial.state == TrialState.COMPLETE:
        return State.COMPLETE.value
    if trial.state == TrialState.PRUNED:
        return (State.INFEASIBLE if trial.user_attrs.get(STATE_ATTR) == State.INFEASIBLE else State.PRUNED).value
    return State.FAIL.value


def recorded_state(trial: FrozenTrial) -> str:
    """The state as recorded: RUNNING for a running trial, else its STATE_ATTR (INTERRUPTED kept apart from FAIL),
    else Optuna's state name (a trial Optuna failed itself, a waiting one, one from an old study)."""
    if trial.state == TrialState.RUNNING:
        return State.RUNNING.value
    return str(trial.user_attrs.get(STATE_ATTR) or trial.state.name)


def recorded_states(study: optuna.Study) -> dict[int, str]:
    """Trial number -> `recorded_state` for every trial of the study (closing stale MLflow runs reads it)."""
    return {t.number: recorded_state(t) for t in study.get_trials(deepcopy=False)}


def outcome_reason(trial: FrozenTrial) -> str | None:
    """Why a trial did not complete, in words: its infeasible or fail reason, or the epoch it was pruned at."""
    attrs = trial.user_attrs
    return (attrs.get(INFEASIBLE_REASON_ATTR) or attrs.get(FAIL_REASON_ATTR)
            or (f"pruned at epoch {attrs[PRUNED_AT_EPOCH_ATTR]}" if PRUNED_AT_EPOCH_ATTR in attrs else None))


def not_completed_reasons(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """``"STATE: reason"`` -> number of trials, over the finished trials that did not complete, most frequent
    first (a trial with no recorded reason counts under its state alone)."""
    counts: Counter[str] = Counter()
    for t in trials:
        if t.state.is_finished() and t.state != TrialState.COMPLETE:
            reason = outcome_reason(t)
            counts[f"{recorded_state(t)}: {reason}" if reason else recorded_state(t)] += 1
    return dict(counts.most_common())


def sampled_params(user_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's sampled values from its user attributes (empty for a trial that died while sampling)."""
    found = user_attrs.get(PARAMS_ATTR)
    return dict(found) if isinstance(found, dict) else {}

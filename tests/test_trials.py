"""The trial record (autokd.trials): stored names, state mappings, `finish` on a real study, the readers."""
from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from autokd.study import record as trials
from autokd.study.record import OPTUNA_STATE, State
from autokd.tracking.base import MLFLOW_STATUS

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---------------------------------------------------------------------------------------------------------
# Stored names and mappings


def test_stored_names_never_change() -> None:
    # Studies made before must still open: these strings are in their storages.
    assert {k: v for k, v in vars(trials).items() if k.endswith("_ATTR") and not k.startswith("_")} == {
        "STATE_ATTR": "autokd_state", "PARAMS_ATTR": "params", "ARCH_KEY_ATTR": "arch_key", "TIMM_ATTR": "timm",
        "LATENCY_ATTR": "latency", "CURVE_ATTR": "curve", "CHECKPOINT_ATTR": "checkpoint", "WORKER_ATTR": "worker",
        "FAIL_REASON_ATTR": "fail_reason", "INFEASIBLE_REASON_ATTR": "infeasible_reason",
        "TRACEBACK_ATTR": "traceback", "PRUNED_AT_EPOCH_ATTR": "pruned_at_epoch", "RETRY_OF_ATTR": "retry_of",
        "REQUEUED_ATTR": "requeued",
        # study-level keys
        "SPACE_FINGERPRINT_ATTR": "space_fingerprint", "DATASET_ATTR": "dataset",
        "DATA_FINGERPRINT_ATTR": "data_fingerprint", "TEACHER_ATTR": "teacher", "EPOCHS_ATTR": "epochs",
        "SPACE_ATTR": "space", "SPACE_PATH_ATTR": "space_path", "VERSION_ATTR": "autokd_version",
        "BUDGET_ATTR": "budget", "DEVICE_ATTR": "device", "INPUT_SIZE_ATTR": "input_size",
        "TRAIN_LIMIT_ATTR": "train_limit", "DATA_DIR_ATTR": "data_dir", "VAL_IMAGES_ATTR": "val_images",
        "TEACHER_VAL_ACC_ATTR": "teacher_val_acc", "TEACHER_ARTIFACT_ATTR": "teacher_artifact",
        "MLFLOW_PARENT_RUN_ATTR": "mlflow_parent_run_id", "MLFLOW_TRACKING_URI_ATTR": "mlflow_tracking_uri",
        "WORKERS_STARTED_ATTR": "workers_started", "REPORT_FOR_FINISHED_ATTR": "report_for_finished",
        "LATENCY_DEVICE_ATTR": "latency_device", "LATENCY_BATCH_ATTR": "latency_batch",
        "LATENCY_SETTINGS_ATTR": "latency_settings", "LATENCY_RETIME_ATTR": "latency_retime",
        "LATENCY_MIXED_ATTR": "latency_mixed"}
    keys = [v for k, v in vars(trials).items() if k.endswith("_ATTR") and not k.startswith("_")]
    assert len(keys) == len(set(keys))  # one name per stored key, one key per name
    assert [s.value for s in State] == ["COMPLETE", "PRUNED", "INFEASIBLE", "FAIL", "INTERRUPTED", "RUNNING"]
    assert all(s == s.value and str(s) == s.value and f"{s:<3}" == s.value for s in State)


def test_state_mappings() -> None:
    assert OPTUNA_STATE == {State.COMPLETE: TrialState.COMPLETE, State.PRUNED: TrialState.PRUNED,
                            State.INFEASIBLE: TrialState.PRUNED, State.FAIL: TrialState.FAIL,
                            State.INTERRUPTED: TrialState.FAIL, State.RUNNING: TrialState.RUNNING}
    assert MLFLOW_STATUS == {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "INFEASIBLE": "FINISHED",
                             "FAIL": "FAILED", "INTERRUPTED": "KILLED"}
    assert set(MLFLOW_STATUS) == {s.value for s in trials.TERMINAL_STATES}
    assert all(type(k) is str for k in MLFLOW_STATUS)  # the tracker lists them in its error messages


# ---------------------------------------------------------------------------------------------------------
# finish() on a real in-memory study


class FakeRun:
    """A tracker run that records its calls and what the study held when it was ended."""

    def __init__(self, study: optuna.Study, number: int = 0) -> None:
        self.study, self.number = study, number
        self.calls: list[tuple] = []
        self.trial_at_end: FrozenTrial | None = None

    def set_tags(self, tags: dict[str, str]) -> None:
        self.calls.append(("set_tags", tags))

    def end(self, state: str, reason: str | None = None) -> None:
        self.calls.append(("end", state, reason))
        self.trial_at_end = self.study.trials[self.number]


def new_trial() -> tuple[optuna.Study, optuna.Trial]:
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    return study, trial


def test_finish_complete() -> None:
    study, trial = new_trial()
    run = FakeRun(study)
    trials.finish(study, trial, State.COMPLETE, values=[0.9, 1.5], run=run)
    ft = study.trials[0]
    assert ft.state == TrialState.COMPLETE and ft.values == [0.9, 1.5]
    assert ft.user_attrs == {"autokd_state": "COMPLETE"}
    assert run.calls == [("end", "COMPLETE", None)]
    assert type(run.calls[0][1]) is str  # a plain string reaches the tracker
    assert run.trial_at_end is not None and run.trial_at_end.state == TrialState.COMPLETE  # ended after the tell


def test_finish_pruned_keeps_its_reason_for_the_run_only() -> None:
    study, trial = new_trial()
    run = FakeRun(study)
    trials.finish(study, trial, State.PRUNED, reason="dominated at epoch 2 among 3 trials", run=run)
    ft = study.trials[0]
    assert ft.state == TrialState.PRUNED and ft.values is None
    assert ft.user_attrs == {"autokd_state": "PRUNED"}
    assert run.calls == [("end", "PRUNED", "dominated at epoch 2 among 3 trials")]
    assert run.trial_at_end.state == TrialState.PRUNED
    assert trials.trial_state(ft) == "PRUNED" and trials.recorded_state(ft) == "PRUNED"


def test_finish_infeasible() -> None:
    study, trial = new_trial()
    run = FakeRun(study)
    trials.finish(study, trial, State.INFEASIBLE, reason="latency 2.000 ms > --max-latency-ms 1.0", run=run)
    ft = study.trials[0]
    assert ft.state == TrialState.PRUNED
    assert ft.user_attrs == {"autokd_state": "INFEASIBLE", "infeasible_reason": "latency 2.000 ms > --max-latency-ms 1.0"}
    assert run.calls == [("end", "INFEASIBLE", "latency 2.000 ms > --max-latency-ms 1.0")]
    assert trials.trial_state(ft) == "INFEASIBLE" and trials.outcome_reason(ft).startswith("latency 2.000 ms")


def test_finish_fail_with_traceback_no_run() -> None:
    study, trial = new_trial()
    tb = "Traceback (most recent call last):\n" + "x" * 10000
    trials.finish(study, trial, State.FAIL, reason="error: RuntimeError: boom", traceback=tb)
    ft = study.trials[0]
    assert ft.state == TrialState.FAIL
    assert ft.user_attrs == {"autokd_state": "FAIL", "fail_reason": "error: RuntimeError: boom",
                             "traceback": tb[-8000:]}
    assert len(study.trials) == 1  # not queued again


def test_finish_fail_tags_the_run_with_the_traceback_before_ending_it() -> None:
    study, trial = new_trial()
    run = FakeRun(study)
    tb = "y" * 6000
    trials.finish(study, trial, State.FAIL, reason="oom", traceback=tb, run=run)
    assert run.calls == [("set_tags", {"autokd.traceback": tb[-4500:]}), ("end", "FAIL", "oom")]


def test_finish_interrupted_requeues_and_ends_the_run_with_its_own_reason() -> None:
    study, trial = new_trial()
    run = FakeRun(study)
    trials.finish(study, trial, State.INTERRUPTED, reason="interrupted (Ctrl-C / SIGTERM)", requeue=True, run=run,
                  run_reason="interrupted")
    first, retry = study.trials
    assert first.state == TrialState.FAIL
    assert first.user_attrs == {"autokd_state": "INTERRUPTED", "fail_reason": "interrupted (Ctrl-C / SIGTERM)",
                                "requeued": True}
    assert retry.state == TrialState.WAITING and retry.user_attrs == {"retry_of": 0}
    assert retry.system_attrs["fixed_params"] == first.params
    assert run.calls == [("end", "INTERRUPTED", "interrupted")]
    assert trials.trial_state(first) == "FAIL" and trials.recorded_state(first) == "INTERRUPTED"
    assert trials.recorded_states(study) == {0: "INTERRUPTED", 1: "WAITING"}


def test_requeue_of_a_trial_without_params_queues_nothing() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    assert trials.requeue_trial(study, trial) is False
    trials.finish(study, trial, State.FAIL, reason="died while sampling", requeue=True)
    assert len(study.trials) == 1 and "requeued" not in study.trials[0].user_attrs


def test_finish_of_a_failing_trial_swallows_recording_errors_but_still_ends_the_run() -> None:
    study, trial = new_trial()
    study.tell(trial, state=TrialState.FAIL)  # told already: every write below raises
    run = FakeRun(study)
    trials.finish(study, trial, State.FAIL, reason="error: OSError: disk full", run=run)
    assert study.trials[0].user_attrs == {}
    assert run.calls[-1] == ("end", "FAIL", "error: OSError: disk full")


def test_finish_of_a_complete_trial_raises_recording_errors_and_leaves_the_run_open() -> None:
    study, trial = new_trial()
    study.tell(trial, state=TrialState.FAIL)
    run = FakeRun(study)
    with pytest.raises(Exception):
        trials.finish(study, trial, State.COMPLETE, values=[0.5, 1.0], run=run)
    assert run.calls == []  # the caller's FAIL branch ends it


@pytest.mark.parametrize("state, values", [(State.RUNNING, None), (State.COMPLETE, None),
                                           (State.PRUNED, [0.5, 1.0]), (State.FAIL, [0.5, 1.0])])
def test_finish_refuses_what_cannot_be_recorded(state: State, values: list[float] | None) -> None:
    study, trial = new_trial()
    with pytest.raises(ValueError):
        trials.finish(study, trial, state, values=values)
    assert study.trials[0].state == TrialState.RUNNING and study.trials[0].user_attrs == {}


# ---------------------------------------------------------------------------------------------------------
# Readers on frozen trials of each kind


def frozen(state: TrialState, **user_attrs: object) -> FrozenTrial:
    values = [0.9, 1.0] if state == TrialState.COMPLETE else None
    return create_trial(state=state, values=values, params={"lr": 0.01},
                        distributions={"lr": FloatDistribution(1e-3, 1e-1, log=True)}, user_attrs=user_attrs)


@pytest.mark.parametrize("state, attrs, report, recorded", [
    (TrialState.COMPLETE, {"autokd_state": "COMPLETE"}, "COMPLETE", "COMPLETE"),
    (TrialState.COMPLETE, {}, "COMPLETE", "COMPLETE"),  # a study from before the attribute
    (TrialState.PRUNED, {"autokd_state": "PRUNED", "pruned_at_epoch": 2}, "PRUNED", "PRUNED"),
    (TrialState.PRUNED, {}, "PRUNED", "PRUNED"),
    (TrialState.PRUNED, {"autokd_state": "INFEASIBLE", "infeasible_reason": "slow"}, "INFEASIBLE", "INFEASIBLE"),
    (TrialState.FAIL, {"autokd_state": "FAIL", "fail_reason": "oom"}, "FAIL", "FAIL"),
    (TrialState.FAIL, {"autokd_state": "INTERRUPTED", "fail_reason": "worker died"}, "FAIL", "INTERRUPTED"),
    (TrialState.FAIL, {}, "FAIL", "FAIL"),  # failed by Optuna's own stale-trial check
    (TrialState.RUNNING, {}, "RUNNING", "RUNNING"),
    (TrialState.WAITING, {"retry_of": 3}, "FAIL", "WAITING"),
])
def test_readers(state: TrialState, attrs: dict, report: str, recorded: str) -> None:
    ft = frozen(state, **attrs)
    assert trials.trial_state(ft) == report and type(trials.trial_state(ft)) is str
    assert trials.recorded_state(ft) == recorded and type(trials.recorded_state(ft)) is str


def test_outcome_reason() -> None:
    assert trials.outcome_reason(frozen(TrialState.COMPLETE)) is None
    assert trials.outcome_reason(frozen(TrialState.PRUNED, pruned_at_epoch=3)) == "pruned at epoch 3"
    assert trials.outcome_reason(frozen(TrialState.PRUNED, infeasible_reason="slow")) == "slow"
    assert trials.outcome_reason(frozen(TrialState.FAIL, fail_reason="oom", pruned_at_epoch=1)) == "oom"


def test_sampled_params() -> None:
    current = {"params": {"family": "resnet", "kd.alpha": 0.5}, "p.family": "ignored", "curve": [0.1]}
    assert trials.sampled_params(current) == {"family": "resnet", "kd.alpha": 0.5}
    assert trials.sampled_params({}) == {}
    found = trials.sampled_params(current)
    found["family"] = "changed"
    assert current["params"]["family"] == "resnet"  # a copy

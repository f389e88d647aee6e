"""The loop of one search worker (autokd.search.worker_loop): it finishes exactly the budget, reports progress,
retries a dead worker's trial, waits while another worker's trial may still need a retry, and stops after
repeated failures; real trials of a tiny student on the local journal storage."""
from __future__ import annotations

import gc
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from conftest import Logged
from optuna.trial import TrialState
from test_objective import SPACE  # one tiny architecture, one epoch, no teacher: the cheapest trial that trains

from autokd.config import SearchSettings
from autokd.errors import FatalSearchError
from autokd.latency.meter import LatencyCache, LatencyMeter
from autokd.model.data import DataSplits, TrainViews, load_dataset
from autokd.model.space import load_space
from autokd.search import objective
from autokd.search.objective import TrialContext, TrialOutcome
from autokd.search.worker_loop import MAX_CONSECUTIVE_FAILURES, SearchProgress, run_trials, search_progress
from autokd.study.record import REQUEUED_ATTR, WORKER_ATTR, State
from autokd.study.store import budget_used, make_storage, study_lock, worker_identity
from autokd.tracking import Tracker

optuna.logging.set_verbosity(optuna.logging.WARNING)



@pytest.fixture(autouse=True)
def _frozen_gc() -> Iterator[None]:
    """As `run_search` does: the objects of the test session are frozen, so the collection after each trial
    scans only what the trial made (not every module the session has imported)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.fixture(scope="module")
def data() -> DataSplits:
    return load_dataset("digits", input_size=16, seed=0, train_limit=96)


def context(tmp_path: Path, data: DataSplits, **overrides: object) -> TrialContext:
    path = tmp_path / "unit.yaml"
    path.write_text(SPACE)
    space = load_space(path)
    meter = LatencyMeter("onnxruntime", "cpu", rounds=3, runs=2, warmup=1, cache=LatencyCache(tmp_path / "latency"))
    base = {"settings": SearchSettings(device="cpu"), "space": space, "data": data, "teacher_outputs": None,
            "teacher_arch": "none", "views": TrainViews(num_views=space.views), "latency": meter,
            "tracker": Tracker("unit"), "parent_run_id": None, "trials_dir": tmp_path / "trials", "device": "cpu"}
    base.update(overrides)
    return TrialContext(**base)  # type: ignore[arg-type]


def infeasible(tmp_path: Path, data: DataSplits) -> TrialContext:
    """Trials that are measured but never trained (the cheapest real trial)."""
    return context(tmp_path, data, settings=SearchSettings(device="cpu", max_latency_ms=1e-6))


def journal_study(root: Path) -> optuna.Study:
    return optuna.create_study(study_name="s", storage=make_storage(None, root), directions=["maximize", "minimize"],
                               sampler=optuna.samplers.RandomSampler(seed=0))


def loop(study: optuna.Study, ctx: TrialContext, budget: int, root: Path, **kwargs: object) -> list[TrialOutcome]:
    kwargs = {"heartbeat_interval": 0, "gpu": None, **kwargs}
    return run_trials(study, ctx, budget, lambda: study_lock(None, root, study.study_name), **kwargs)  # type: ignore[arg-type]


def dead_worker() -> dict:
    """The identity of a worker process on this machine that has exited."""
    child = subprocess.Popen(["true"])
    child.wait()
    return {**worker_identity(), "pid": child.pid}


def test_the_budget_is_finished_exactly_and_each_trial_reports_progress(tmp_path: Path, data: DataSplits) -> None:
    study, ctx = journal_study(tmp_path), infeasible(tmp_path, data)
    study.add_trial(optuna.trial.create_trial(values=[0.9, 1.0]))  # a finished trial of an earlier run
    seen: list[tuple[TrialOutcome, SearchProgress]] = []
    outcomes = loop(study, ctx, 3, tmp_path, on_trial=lambda o, p: seen.append((o, p)), gpu="GPU-test")
    assert [o.state for o in outcomes] == [State.INFEASIBLE] * 2 and [o for o, _ in seen] == outcomes
    assert [p.done for _, p in seen] == [2, 3] and all(p.budget == 3 and p.front == 1 for _, p in seen)
    assert seen[0][1].eta_s > 0 and seen[-1][1].eta_s == 0.0
    assert all(o.timings["claim_s"] >= 0 for o in outcomes)
    assert budget_used(study) == 3 and len(study.trials) == 3
    for t in study.get_trials(deepcopy=False)[1:]:  # who ran it, for the reaper and the report
        worker = t.user_attrs[WORKER_ATTR]
        assert worker["pid"] == os.getpid() and worker["heartbeat"] is False and worker["gpu"] == "GPU-test"
        assert worker["threads"] == torch.get_num_threads()

    # The same command again finds the budget taken: nothing runs. A larger budget tops the study up.
    assert loop(study, ctx, 3, tmp_path) == []
    assert [o.number for o in loop(study, ctx, 4, tmp_path)] == [3] and budget_used(study) == 4


def test_a_dead_workers_trial_is_retried_within_the_budget(tmp_path: Path, data: DataSplits, logged: Logged) -> None:
    study, ctx = journal_study(tmp_path), infeasible(tmp_path, data)
    loop(study, ctx, 1, tmp_path)
    orphan = study.ask(fixed_distributions=study.trials[0].distributions)  # a trial whose worker was killed
    orphan.set_user_attr(WORKER_ATTR, dead_worker())
    before = len(logged())
    outcomes = loop(study, ctx, 2, tmp_path)
    assert logged()[before:] == [f"trial {orphan.number}: its worker died; marked FAIL and queued again"]
    _, dead, retry = study.get_trials(deepcopy=False)
    assert dead.state == TrialState.FAIL and dead.user_attrs[REQUEUED_ATTR] is True
    assert retry.user_attrs["retry_of"] == dead.number and retry.params == dead.params
    assert [o.number for o in outcomes] == [retry.number] and budget_used(study) == 2


def test_a_full_budget_waits_for_a_trial_beating_elsewhere(tmp_path: Path, data: DataSplits) -> None:
    study, ctx = journal_study(tmp_path), infeasible(tmp_path, data)
    running = study.ask()
    # Without heartbeats nobody could retry it if its worker died: the budget is taken, the loop ends.
    running.set_user_attr(WORKER_ATTR, {**worker_identity(), "host": "another-machine", "heartbeat": False})
    assert loop(study, ctx, 1, tmp_path) == []
    # With heartbeats its worker may still die and its retry need a worker here: the loop waits for it.
    running.set_user_attr(WORKER_ATTR, {**worker_identity(), "host": "another-machine", "heartbeat": True})
    result: list[list[TrialOutcome]] = []
    waiter = threading.Thread(target=lambda: result.append(loop(study, ctx, 1, tmp_path, heartbeat_interval=0.1)),
                              daemon=True)
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive() and not result, "the loop returned while another worker's trial still ran"
    study.tell(running, [0.5, 1.0])  # the other worker finishes its trial
    waiter.join(60)
    assert not waiter.is_alive(), "the loop did not return within 60 s of the last trial finishing"
    assert result == [[]] and len(study.trials) == 1


def test_repeated_failures_stop_the_search_and_a_success_resets_the_count(tmp_path: Path, data: DataSplits,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = objective.distill, []

    def fails_but_the_fifth(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == MAX_CONSECUTIVE_FAILURES:
            return real(*args, **kwargs)
        raise RuntimeError("boom")

    monkeypatch.setattr(objective, "distill", fails_but_the_fifth)
    study, ctx = journal_study(tmp_path), context(tmp_path, data)
    with pytest.raises(FatalSearchError, match=rf"the last {MAX_CONSECUTIVE_FAILURES} trials all failed \(last "
                                               r"reason: error: RuntimeError: boom\); stopping"):
        loop(study, ctx, 50, tmp_path)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    expected = [TrialState.FAIL] * (MAX_CONSECUTIVE_FAILURES - 1) + [TrialState.COMPLETE]
    assert states == expected + [TrialState.FAIL] * MAX_CONSECUTIVE_FAILURES  # the rest of the budget not burnt


def test_search_progress_counts_the_study(tmp_path: Path) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    mine, other = {WORKER_ATTR: {"pid": os.getpid()}}, {WORKER_ATTR: {"pid": -1}}
    study.add_trial(optuna.trial.create_trial(values=[0.9, 2.0], user_attrs=mine))
    study.add_trial(optuna.trial.create_trial(values=[0.8, 1.0], user_attrs=other))
    study.add_trial(optuna.trial.create_trial(values=[0.7, 3.0], user_attrs=mine))  # dominated
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs=other))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs={"autokd_state": "INFEASIBLE"}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={REQUEUED_ATTR: True, **mine}))
    study.ask()  # running
    started = time.perf_counter() - 12.0
    progress = search_progress(study, 8, started)
    assert (progress.done, progress.budget, progress.pruned, progress.front) == (5, 8, 1, 2)
    assert progress.elapsed_s >= 12.0
    # This worker's pace: its 3 finished trials (the requeued one too) in the elapsed time, for the 3 left.
    assert progress.eta_s == pytest.approx(progress.elapsed_s / 3 * 3)
    assert search_progress(study, 5, started).eta_s == 0.0

    nothing = optuna.create_study(directions=["maximize", "minimize"])
    nothing.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED))
    assert search_progress(nothing, 3, time.perf_counter()).front == 0  # no complete trial, no front

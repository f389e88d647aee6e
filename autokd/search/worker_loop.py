"""The loop of one search worker: claim a budget slot under the study lock, run the trial, report it, repeat.

Claiming under the lock is what makes all workers of a study (on this machine or others) together finish
exactly its budget. Before each claim the loop fails and queues again the trials of workers that died. It
stops when the budget is taken and no other worker's trial may still need a retry, or after
`MAX_CONSECUTIVE_FAILURES` failed trials in a row.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, ContextManager

import optuna
import torch

from autokd.errors import FatalSearchError
from autokd.search.objective import Stopwatch, TrialContext, TrialOutcome, run_trial
from autokd.study.record import REQUEUED_ATTR, WORKER_ATTR, State, trial_state
from autokd.study.store import (
    ask_with_heartbeat,
    budget_used,
    fail_stale_trials,
    reap_dead_trials,
    worker_identity,
)

logger = logging.getLogger(__name__)

# After this many failures in a row the search stops instead of burning the rest of the budget.
MAX_CONSECUTIVE_FAILURES = 5


@dataclass(frozen=True)
class SearchProgress:
    """Where the study stands after a trial of this worker, for a progress display."""

    done: int  # finished trials that count against the budget
    budget: int
    pruned: int
    front: int  # trials on the Pareto front
    elapsed_s: float  # since this worker's loop started
    eta_s: float  # at this worker's pace


OnTrial = Callable[[TrialOutcome, SearchProgress], None]


def search_progress(study: optuna.Study, budget: int, started: float) -> SearchProgress:
    """Count the study's finished, pruned and front trials; ETA from this worker's own pace since ``started``."""
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.is_finished()]
    pruned = sum(1 for t in finished if trial_state(t) == State.PRUNED)
    front = len(study.best_trials) if any(t.state == optuna.trial.TrialState.COMPLETE for t in finished) else 0
    elapsed = time.perf_counter() - started
    done = len([t for t in finished if not t.user_attrs.get(REQUEUED_ATTR)])  # what counts against the budget
    mine = max(1, len([t for t in finished if t.user_attrs.get(WORKER_ATTR, {}).get("pid") == os.getpid()]))
    eta = elapsed / mine * max(0, budget - done) if done < budget else 0.0
    return SearchProgress(done=done, budget=budget, pruned=pruned, front=front, elapsed_s=elapsed, eta_s=eta)


def run_trials(study: optuna.Study, ctx: TrialContext, budget: int, study_lock: Callable[[], ContextManager[None]],
               heartbeat_interval: float, gpu: str | None, on_trial: OnTrial | None = None) -> list[TrialOutcome]:
    """Run trials of ``study`` until it holds ``budget`` finished ones; returns this worker's outcomes.

    ``study_lock()`` is the study-wide lock claims are made under; ``heartbeat_interval`` (seconds, 0 without
    heartbeats) is also how long to wait while the budget is taken but other workers' trials still run.
    ``on_trial(outcome, progress)`` is called after each trial; the trials of dead workers it fails are logged.
    Each outcome's ``timings["claim_s"]`` is the time of its iteration outside the trial (lock, reaping, claim).
    Raises FatalSearchError after `MAX_CONSECUTIVE_FAILURES` failed trials in a row.
    """
    outcomes: list[TrialOutcome] = []
    started = time.perf_counter()
    consecutive_failures = 0
    while True:
        trial = None
        watch = Stopwatch()
        with study_lock():
            for number in reap_dead_trials(study):
                logger.info(f"trial {number}: its worker died; marked FAIL and queued again")
            for number in fail_stale_trials(study):
                logger.info(f"trial {number}: no heartbeat from its worker (on another machine?); marked FAIL and "
                            "queued again")
            if budget_used(study) < budget:
                trial, heartbeat = ask_with_heartbeat(study)
                trial.set_user_attr(WORKER_ATTR, {**worker_identity(), "heartbeat": bool(heartbeat_interval),
                                                  "threads": torch.get_num_threads(), "gpu": gpu})
            elif not _beating_elsewhere(study):
                return outcomes
        if trial is None:
            # The budget is taken, but other workers' trials still run: one of them may be a dead worker's,
            # failed once its heartbeats stop, and its retry needs a worker. Wait and look again.
            time.sleep(heartbeat_interval)
            continue
        try:
            outcome = run_trial(study, trial, ctx)
        finally:
            heartbeat.join()
        outcome.timings["claim_s"] = watch.elapsed() - outcome.seconds
        outcomes.append(outcome)
        if on_trial is not None:
            on_trial(outcome, search_progress(study, budget, started))
        consecutive_failures = consecutive_failures + 1 if outcome.state == State.FAIL else 0
        if consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            raise FatalSearchError(
                f"the last {consecutive_failures} trials all failed (last reason: {outcome.reason}); stopping "
                f"instead of burning the budget. See the trials' fail_reason/traceback in optuna-dashboard or "
                "MLflow, fix the cause, and rerun the same command to resume.")


def _beating_elsewhere(study: optuna.Study) -> bool:
    """Whether a RUNNING trial has a worker with heartbeats (which `fail_stale_trials` fails if it dies)."""
    return any((t.user_attrs.get(WORKER_ATTR) or {}).get("heartbeat")
               for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))

"""The tracking interface (`Tracker`, `TrialRun`, `ArtifactReader`); these base classes are the no-op used with
--no-mlflow. Import them from `autokd.tracking`; the MLflow implementation (`autokd.tracking._mlflow`) subclasses
them, which is why they do not live in `autokd.tracking` itself (its factory imports that implementation).
"""
from __future__ import annotations

from pathlib import Path


class TrialRun:
    """The child run of one trial. This base class is the no-op run: every method does nothing."""

    run_id: str = ""

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Log one epoch's metrics at ``step=epoch`` (a single batch call)."""

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Log step-less metrics (final values) in a single batch call."""

    def log_params(self, params: dict[str, object]) -> None:
        """Log params; values are ``str()``-ed and truncated to MLflow's limit."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set tags on the run."""

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        """Upload every file under ``local_dir``."""

    def flush(self) -> None:
        """Wait until everything logged so far is in the store (an interrupted run's ``end`` does this)."""

    def end(self, state: str, reason: str | None = None) -> None:
        """End the run with the MLflow status for autokd ``state`` (see ``MLFLOW_STATUS``); idempotent."""


class ArtifactReader:
    """Reads the artifacts of runs in one store, at once (nothing queued). This base class reads nothing."""

    def download_artifacts(self, run_id: str, artifact_path: str, dst: Path) -> Path | None:
        """Download run ``run_id``'s ``artifact_path`` into ``dst``: the local folder (None: tracking is off).

        Raises when the store fails or has no such run.
        """
        return None

    def finished_trial_run(self, parent_run_id: str, trial_number: int) -> str | None:
        """The id of trial ``trial_number``'s FINISHED run under ``parent_run_id`` (None if there is none).

        Raises when the store fails or has no such parent run.
        """
        return None


class Tracker(ArtifactReader):
    """Study-level tracking: one parent run per study, one child run per trial. This base class is the no-op
    tracker used with ``--no-mlflow``.

    The parent is RUNNING while a search on the study runs (``resume_parent`` when a search restarts it) and is
    ended by the worker that finishes last (``end_parent``); a child run is RUNNING exactly while its trial runs.
    """

    enabled: bool = False
    tracking_uri: str | None = None
    spooling: bool = False

    def __init__(self, experiment_name: str = "") -> None:
        self.experiment_name = experiment_name

    def create_parent_run(self, study_name: str, tags: dict[str, str], params: dict[str, object]) -> str | None:
        """Create the study's parent run and return its id (None when tracking is off)."""
        return None

    def parent_run_exists(self, run_id: str) -> bool:
        """Whether ``run_id`` is a live (not deleted) run of this study's experiment."""
        return False

    def start_trial(self, parent_run_id: str | None, trial_number: int, params: dict[str, object],
                    tags: dict[str, str]) -> TrialRun:
        """Create the RUNNING child run of trial ``trial_number``."""
        return TrialRun()

    def close_stale_runs(self, parent_run_id: str | None, trial_states: dict[int, str]) -> int:
        """End children still RUNNING whose trial no longer runs; returns how many were closed."""
        return 0

    def log_parent_artifacts(self, parent_run_id: str, files: list[Path], artifact_path: str = "report") -> None:
        """Upload report files to the parent run."""

    def upload_artifacts(self, run_id: str, files: list[Path], artifact_path: str) -> None:
        """Upload ``files`` to run ``run_id`` under ``artifact_path`` now, not queued behind the run's other calls.

        Raises when the store fails: for files other machines need, where a later retry is no use.
        """

    def end_parent(self, parent_run_id: str, status: str = "FINISHED") -> None:
        """(Re)set the parent's terminal status and end time."""

    def resume_parent(self, parent_run_id: str) -> None:
        """Mark the parent RUNNING again: a search on the study (re)starts."""

    def flush(self) -> None:
        """Wait until every trial run's queued MLflow calls are in the store (runs end without waiting)."""


# The MLflow status a trial's run ends with, by autokd's terminal trial state (`autokd.study.record.State`, a
# str enum: its values are the keys). Tracking sits below the study package, so it takes states as strings;
# tests/test_trials.py pins that the keys are exactly the terminal states.
MLFLOW_STATUS: dict[str, str] = {
    "COMPLETE": "FINISHED",
    "PRUNED": "FINISHED",
    "INFEASIBLE": "FINISHED",
    "FAIL": "FAILED",
    "INTERRUPTED": "KILLED",
}

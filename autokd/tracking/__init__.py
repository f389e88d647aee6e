"""Experiment tracking, the only way into MLflow: one parent run per study, one child run per trial, and the
artifacts other machines need; the no-op tracker when tracking is off (--no-mlflow).

Other modules use the interface (`Tracker`, `TrialRun`, `ArtifactReader`), `make_tracker`, `artifact_reader` and
the helpers here; the MLflow implementation is private (`autokd.tracking._mlflow`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from autokd.errors import UserError
from autokd.tracking import _mlflow as _mlflow_tracking
from autokd.tracking._mlflow import experiment_id_of, limit_http_retries
from autokd.tracking.base import ArtifactReader, Tracker, TrialRun

__all__ = ["ArtifactReader", "Tracker", "TrialRun", "artifact_reader", "default_tracking_uri",
           "experiment_id_of", "limit_http_retries", "make_tracker", "runs_page_url", "spool_dir", "ui_command"]

SPOOL_DIRNAME = "mlflow_spool"


def default_tracking_uri(studies_root: Path) -> str:
    """The local MLflow store shared by all studies under ``studies_root`` (a SQLite database).

    Not MLflow's ``file:`` store: MLflow deprecates it (recent versions refuse to open one unless
    ``MLFLOW_ALLOW_FILE_STORE=true``), and creating an experiment there is not atomic between processes.
    """
    return "sqlite:///" + str((Path(studies_root) / "mlflow.db").resolve())


def spool_dir(studies_root: Path | str, study_name: str) -> Path:
    """Where a study's unsent MLflow calls wait: ``<study dir>/mlflow_spool`` (the study dir of study.study_dir)."""
    return Path(studies_root) / study_name / SPOOL_DIRNAME


def ui_command(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """Command line that serves the MLflow UI for a local store (``autokd ui`` runs it)."""
    if _mlflow_tracking.is_http(tracking_uri):
        raise UserError(
            f"MLflow tracking URI {tracking_uri!r} is already a tracking server: open it in a browser "
            "instead of starting a UI (autokd ui serves local stores such as sqlite:///studies/mlflow.db).")
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(port), "--workers", "1"]


def runs_page_url(base_url: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's runs table (nested trials under the study's parent run).

    ``workflowType=machine_learning`` is the query parameter MLflow 3's UI reads for its GenAI / model-training
    switch, so the link opens on the runs even in a browser whose last choice was GenAI.
    """
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def make_tracker(tracking_uri: str | None, enabled: bool, studies_root: Path, experiment_name: str) -> Tracker:
    """The study's tracker: a no-op when disabled, else MLflow at ``tracking_uri`` (local default if None).

    An MLflow tracker first sends what an outage left in the study's spool. Raises UserError when the store
    cannot be reached or used.
    """
    if not enabled:
        return Tracker(experiment_name)
    studies_root = Path(studies_root)
    uri = tracking_uri or default_tracking_uri(studies_root)
    return _mlflow_tracking.open_tracker(uri, studies_root, experiment_name,
                                         spool_dir(studies_root, experiment_name))


def artifact_reader(tracking_uri: str) -> ArtifactReader:
    """A reader of the run artifacts in the MLflow store at ``tracking_uri``, e.g. one another worker logged to."""
    return _mlflow_tracking.artifact_reader(tracking_uri)

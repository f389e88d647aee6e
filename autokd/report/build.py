"""From a study to its report: trial points, test accuracy of the front (the only use of the test split), files.

`autokd report` and the end of `autokd search` both call `build_report`.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from autokd.errors import UserError, as_user_error, did_you_mean
from autokd.latency import retiming
from autokd.report.render import ReportResult, format_front_table, write_report
from autokd.select.pareto import TrialPoint, check_hv_ref, check_picks, wilson_interval
from autokd.study.record import (
    ARCH_KEY_ATTR,
    CURVE_ATTR,
    FAIL_REASON_ATTR,
    LATENCY_ATTR,
    MLFLOW_PARENT_RUN_ATTR,
    MLFLOW_TRACKING_URI_ATTR,
    VAL_IMAGES_ATTR,
    State,
    sampled_params,
    trial_state,
)
from autokd.study.store import make_storage, storage_missing, storage_url, study_dir
from autokd.tracking import Tracker

if TYPE_CHECKING:
    from autokd.model.data import DataSplits

logger = logging.getLogger(__name__)


def resolve_study(study_name: str | None, storage: str | None, root: Path) -> optuna.Study:
    """Load a study for reading; with no name, the only study in the storage or the most recently active one."""
    if storage_missing(storage, root):  # opening it would create the file: a failed command leaves nothing
        store = None
        summaries = []
    else:
        store = make_storage(storage, root)
        summaries = optuna.get_all_study_summaries(store, include_best_trial=False)
    names = [s.study_name for s in summaries]
    if study_name is None:
        if not summaries:
            raise UserError(f"no study in {storage_url(storage, root)}; run `autokd search` first")
        recent = max(summaries, key=lambda s: (s.datetime_start.timestamp() if s.datetime_start else 0.0))
        study_name = recent.study_name
        if len(summaries) > 1:
            logger.info(f"(no --study given: using the most recent study {study_name!r}; others: "
                        f"{', '.join(n for n in names if n != study_name)})")
    if study_name not in names:
        raise UserError(f"--study {study_name!r}: no such study in {storage_url(storage, root)}"
                        f"{did_you_mean(study_name, names)}; "
                        f"studies there: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=study_name, storage=store)


def trial_points(study: optuna.Study) -> list[TrialPoint]:
    """Every trial of the study as a report point (params flattened, latency from the user attributes, replaced by
    the front's re-timing where there is one; intervals: latency from its measurement, accuracy Wilson on the
    study's validation images)."""
    points = []
    val_images = study.user_attrs.get(VAL_IMAGES_ATTR)
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        state = trial_state(t)
        measured = t.user_attrs.get(LATENCY_ATTR) or {}
        latency = measured.get("median_ms")
        val_acc = t.values[0] if state == State.COMPLETE and t.values else None
        params = sampled_params(t.user_attrs)
        curve = t.user_attrs.get(CURVE_ATTR) or []
        latency_ci = None
        if measured.get("low_ms") is not None and measured.get("high_ms") is not None:
            latency_ci = (float(measured["low_ms"]), float(measured["high_ms"]))
        acc_ci = wilson_interval(val_acc, int(val_images)) if val_acc is not None and val_images else None
        points.append(TrialPoint(number=t.number, state=state, val_acc=val_acc, latency_ms=latency, params=params,
                                 acc_ci=acc_ci, latency_ci=latency_ci, arch_key=t.user_attrs.get(ARCH_KEY_ATTR),
                                 epochs=len(curve), last_val_acc=curve[-1] if curve else None,
                                 param_count=measured.get("params") or None,
                                 reason=t.user_attrs.get(FAIL_REASON_ATTR) or None))
    retiming.apply(points, retiming.stored(study))
    return points


def study_data(study: optuna.Study, data_dir: str | None = None) -> DataSplits:
    """Reload the study's dataset exactly as the search saw it (checked against the stored fingerprint)."""
    from autokd.model.data import load_dataset
    from autokd.study.record import (
        DATA_DIR_ATTR,
        DATA_FINGERPRINT_ATTR,
        DATASET_ATTR,
        INPUT_SIZE_ATTR,
        TRAIN_LIMIT_ATTR,
    )

    attrs = study.user_attrs
    data = load_dataset(attrs.get(DATASET_ATTR, "digits"), data_dir=data_dir or attrs.get(DATA_DIR_ATTR),
                        input_size=attrs.get(INPUT_SIZE_ATTR), seed=0, train_limit=attrs.get(TRAIN_LIMIT_ATTR))
    stored = attrs.get(DATA_FINGERPRINT_ATTR)
    if stored and data.fingerprint != stored:
        raise UserError(f"study {study.study_name!r}: the dataset loaded now differs from the one the study was run on "
                        f"(fingerprint {data.fingerprint} != {stored})")
    return data


def latency_precision(study: optuna.Study) -> str | None:
    """What the study timed: ``fp32`` or ``int8`` (``--latency-precision``); None before its latency is pinned."""
    from autokd.study.record import LATENCY_SETTINGS_ATTR

    return (study.user_attrs.get(LATENCY_SETTINGS_ATTR) or {}).get("precision")


def int8_accuracies(study: optuna.Study, front: list[TrialPoint], root: Path, data: DataSplits) -> None:
    """Each front member's fp32 and INT8 test accuracy (ONNX Runtime, as ``autokd export --int8`` makes them;
    computed once per trial and cached) into their ``fp32_test_acc`` / ``int8_test_acc``."""
    from autokd.report.evaluation import trial_int8_accuracy

    for point in front:
        try:
            acc = trial_int8_accuracy(study, point.number, root, data)
        except Exception as exc:  # noqa: BLE001 - the report is still written, without this member's figures
            logger.warning(f"warning: trial {point.number}: no INT8 test accuracy ({exc.__class__.__name__}: {exc})")
            continue
        point.fp32_test_acc, point.int8_test_acc = acc["fp32_test_acc"], acc["test_acc"]


def build_report(study: optuna.Study, root: Path, data: DataSplits | None = None, max_latency_ms: float | None = None,
                 tolerance_pp: float = 1.0, hv_ref_ms: float | None = None, tracker: Tracker | None = None,
                 parent_run_id: str | None = None, data_dir: str | None = None) -> ReportResult | None:
    """Write studies/<name>/report/ for the study, log the front table, attach the files to MLflow."""
    points = trial_points(study)
    if not any(p.state == State.COMPLETE for p in points):
        logger.info(f"study {study.study_name!r}: no completed trial yet, no report")
        return None
    from autokd.report.evaluation import test_accuracy
    from autokd.select.pareto import front_points
    from autokd.study import scaleout

    with as_user_error():  # the caller's --hv-ref-ms, --max-latency-ms, --tolerance: checked before any work
        if hv_ref_ms is not None:
            check_hv_ref((0.0, hv_ref_ms))
        check_picks(max_latency_ms, tolerance_pp)
    if data is None:
        data = study_data(study, data_dir)
    # Every front candidate timed again, together: the report, its picks and `autokd export` use these figures.
    retiming.apply(points, retiming.retime_front(study, points, data))
    front = front_points(points)
    # Front students trained on other machines (or removed here) come from their trials' MLflow runs.
    scaleout.fetch_trial_checkpoints(study, study_dir(root, study.study_name) / "trials", [p.number for p in front])
    for point in front:
        point.test_acc = test_accuracy(study, point.number, root, data)
    if latency_precision(study) == "int8":
        int8_accuracies(study, front, root, data)
    hv_ref = None
    if hv_ref_ms is not None:
        hv_ref = (0.0, float(hv_ref_ms))
    out_dir = study_dir(root, study.study_name) / "report"
    result = write_report(points, out_dir, title=f"autokd study {study.study_name}", max_latency_ms=max_latency_ms,
                          tolerance_pp=tolerance_pp, hv_ref=hv_ref)
    logger.info(format_front_table(result.front, result.recommendations, result.ties))
    logger.info(f"hypervolume {result.hypervolume:.4f} (reference point: accuracy {result.hv_ref[0]}, latency "
                f"{result.hv_ref[1]:.3f} ms) — report: {out_dir}/report.html")
    if tracker is None:
        from autokd.tracking import make_tracker

        uri = study.user_attrs.get(MLFLOW_TRACKING_URI_ATTR)
        parent_run_id = study.user_attrs.get(MLFLOW_PARENT_RUN_ATTR)
        tracker = make_tracker(uri, bool(parent_run_id), root, experiment_name=study.study_name) if parent_run_id \
            else None
    if tracker is not None and parent_run_id:
        try:
            tracker.log_parent_artifacts(parent_run_id, result.files, "report")
        except Exception as exc:  # noqa: BLE001 - the report on disk is what matters; MLflow is a copy
            logger.warning(f"warning: could not attach the report to MLflow run {parent_run_id}: {exc}")
    return result


def report_command(study_name: str | None, storage: str | None, root: Path, max_latency_ms: float | None,
                   tolerance_pp: float, hv_ref_ms: float | None, data_dir: str | None) -> ReportResult | None:
    """`autokd report`."""
    if not (math.isfinite(tolerance_pp) and tolerance_pp >= 0):
        raise UserError(f"--tolerance {tolerance_pp}: must be a number >= 0 (accuracy percentage points)")
    study = resolve_study(study_name, storage, root)
    return build_report(study, root, max_latency_ms=max_latency_ms, tolerance_pp=tolerance_pp, hv_ref_ms=hv_ref_ms,
                        data_dir=data_dir)

"""Re-timing the front before a report (autokd.latency.retiming): which students are candidates, the figures
recorded in the study and put into the points, and when the stored figures are kept; real tiny students timed
with ONNX Runtime."""
from __future__ import annotations

from typing import Any

import optuna
import pytest
from conftest import Logged

from autokd.latency import retiming
from autokd.latency.meter import LatencyMeter
from autokd.latency.pinning import check_latency_device
from autokd.model.data import DataSplits, load_dataset
from autokd.model.students import resolve_student
from autokd.select.pareto import TrialPoint
from autokd.study.record import (
    ARCH_KEY_ATTR,
    LATENCY_DEVICE_ATTR,
    LATENCY_MIXED_ATTR,
    LATENCY_RETIME_ATTR,
    LATENCY_SETTINGS_ATTR,
    PARAMS_ATTR,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def point(number: int, acc: float | None, latency: float | None, state: str = "COMPLETE",
          key: str | None = None) -> TrialPoint:
    return TrialPoint(number, state, acc, latency, arch_key=key or f"arch{number}")


# --- candidates and apply (pure) ---------------------------------------------------------------------------

def test_candidates_are_the_front_and_the_students_within_the_margin_of_it() -> None:
    fast, best = point(0, 0.80, 1.0), point(1, 0.90, 2.0)
    near = point(2, 0.85, 2.4)  # dominated by `best`, but 2.4 / 1.25 = 1.92 would put it on the front
    far = point(3, 0.85, 2.6)  # 2.6 / 1.25 = 2.08: still dominated
    others = [point(4, None, 0.5, "PRUNED"), point(5, None, 0.4, "INFEASIBLE"), point(6, 0.99, None),
              point(7, None, 0.3)]
    chosen = retiming.candidates([far, near, best, fast, *others])
    assert [p.number for p in chosen] == [0, 1, 2]  # by latency; never an unfinished or unmeasured trial
    assert [p.number for p in retiming.candidates([far, near, best, fast], margin=0.0)] == [0, 1]
    assert [p.number for p in retiming.candidates([far, near, best, fast], margin=0.5)] == [0, 1, 2, 3]


def test_candidates_are_capped_at_the_fastest() -> None:
    # Every point on the front (accuracy grows with latency): only the fastest MAX_CANDIDATES are re-timed.
    points = [point(n, 0.5 + n / 1000, 1.0 + n) for n in range(retiming.MAX_CANDIDATES + 10)]
    chosen = retiming.candidates(list(reversed(points)))
    assert [p.number for p in chosen] == list(range(retiming.MAX_CANDIDATES))
    tied = [point(0, 0.7, 1.0), point(1, 0.8, 1.0)]
    assert [p.number for p in retiming.candidates(tied, margin=0.0)] == [1]  # the same latency: one is dominated
    assert [p.number for p in retiming.candidates(tied)] == [1, 0]  # within the margin; the more accurate first


def test_apply_replaces_latency_and_keeps_the_first_measurement() -> None:
    a, b, c = point(0, 0.9, 2.0, key="a"), point(1, 0.8, 1.0, key="b"), point(2, 0.7, 3.0, key="c")
    b.latency_ci = (0.9, 1.1)
    pruned = point(3, None, None, "PRUNED", key="a")
    archs: dict[str, dict[str, Any]] = {"a": {"median_ms": 1.5, "low_ms": 1.4, "high_ms": 1.6},
                                        "b": {"median_ms": 1.2}}
    retiming.apply([a, b, c, pruned], archs)
    assert (a.latency_ms, a.latency_ci, a.latency_first_ms) == (1.5, (1.4, 1.6), 2.0)
    assert (b.latency_ms, b.latency_ci, b.latency_first_ms) == (1.2, (0.9, 1.1), 1.0)  # no interval: kept
    assert c.latency_ms == 3.0 and c.latency_first_ms is None  # not re-timed: untouched
    assert pruned.latency_ms is None and pruned.latency_first_ms is None  # never measured: nothing to put
    retiming.apply([a], {"a": {"median_ms": 1.7}})
    assert a.latency_ms == 1.7 and a.latency_first_ms == 2.0  # the first measurement stays the first


# --- retime_front on a real study ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data() -> DataSplits:
    return load_dataset("digits", input_size=16, seed=0, train_limit=96)


def make_study(data: DataSplits, meter: LatencyMeter | None = None) -> tuple[optuna.Study, list[TrialPoint]]:
    """A study timed with ``meter`` (pinned the way a search pins it) and five finished trials of real students:
    two on the front, one within the margin of it, one far behind, a second trial of the first architecture (its
    depth rounds to the same student), and a pruned one."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    if meter is not None:
        check_latency_device(study, meter.signature(), meter.batch, False,
                             settings={**meter.signature_info(), "torch_device": meter.dev.type})
    plan = [("resnet", 0.25, 0.25, 0.80, 0.5), ("resnet", 0.5, 0.25, 0.90, 1.0), ("resnet", 0.25, 1.0, 0.86, 1.2),
            ("vit", 0.25, 0.25, 0.50, 9.0), ("resnet", 0.25, 0.5, 0.79, 0.55)]
    points = []
    for number, (family, width, depth, acc, latency) in enumerate(plan):
        spec = resolve_student(family, width, depth, data.num_classes, data.in_chans, data.input_size)
        attrs = {PARAMS_ATTR: {"family": family, "width": width, "depth": depth}, ARCH_KEY_ATTR: spec.key}
        study.add_trial(optuna.trial.create_trial(values=[acc, latency], user_attrs=attrs))
        points.append(TrialPoint(number, "COMPLETE", acc, latency, arch_key=spec.key))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs={
        PARAMS_ATTR: {"family": "resnet", "width": 1.0, "depth": 1.0}, ARCH_KEY_ATTR: "never-timed"}))
    points.append(TrialPoint(5, "PRUNED", None, 0.1, arch_key="never-timed"))
    return study, points


def test_front_candidates_are_retimed_together_and_recorded(data: DataSplits, logged: Logged) -> None:
    meter = LatencyMeter("onnxruntime", "cpu")
    study, points = make_study(data, meter)
    archs, logs = _retime_logs(study, points, data, logged)
    front_keys = {p.arch_key for p in points[:3]}
    assert len(front_keys) == 3 and points[4].arch_key == points[0].arch_key
    # Not the far-behind ViT nor the pruned trial; the architecture of two trials is timed once.
    assert set(archs) == front_keys
    for figures in archs.values():
        assert 0 < figures["low_ms"] <= figures["median_ms"] <= figures["high_ms"]
        assert figures["rounds"] == meter.rounds
    record = study.user_attrs[LATENCY_RETIME_ATTR]
    assert record["signature"] == study.user_attrs[LATENCY_DEVICE_ATTR] == meter.signature()
    assert record["archs"] == archs and record["runtime"] == meter.describe() and record["seconds"] >= 0
    assert "interleaved" in record["protocol"] and record["when"]
    assert retiming.stored(study) == archs
    assert [m for m in logs if m.startswith("latency: re-timed 3 front candidate(s) together")], logs

    retiming.apply(points, archs)
    for p in [*points[:3], points[4]]:
        assert p.latency_ms == archs[p.arch_key]["median_ms"] and p.latency_first_ms is not None
    assert points[3].latency_ms == 9.0

    # A second report (the same candidates) keeps the recorded figures instead of timing again.
    assert _retime_logs(study, points, data, logged) == (archs, [])
    assert study.user_attrs[LATENCY_RETIME_ATTR] == record


def test_stored_figures_count_only_for_the_studys_latency_device(data: DataSplits) -> None:
    study, _ = make_study(data, LatencyMeter("onnxruntime", "cpu"))
    assert retiming.stored(study) == {}  # never re-timed
    figures = {"k": {"median_ms": 1.0, "low_ms": 0.9, "high_ms": 1.1}}
    study.set_user_attr(LATENCY_RETIME_ATTR, {"signature": study.user_attrs[LATENCY_DEVICE_ATTR], "archs": figures})
    assert retiming.stored(study) == figures
    study.set_user_attr(LATENCY_RETIME_ATTR, {"signature": "another-device", "archs": figures})
    assert retiming.stored(study) == {}


def _retime_logs(study: optuna.Study, points: list[TrialPoint], data: DataSplits,
                 logged: Logged) -> tuple[dict, list[str]]:
    """What ``retime_front`` returns, and the messages it logged."""
    before = len(logged())
    return retiming.retime_front(study, points, data), logged()[before:]


def test_no_retiming_without_recorded_settings(data: DataSplits, logged: Logged) -> None:
    study, points = make_study(data)  # a study from before latency settings were recorded
    assert _retime_logs(study, points, data, logged) == ({}, [])
    assert LATENCY_RETIME_ATTR not in study.user_attrs


def test_no_retiming_of_a_study_that_mixes_latency_devices(data: DataSplits, logged: Logged) -> None:
    study, points = make_study(data, LatencyMeter("onnxruntime", "cpu"))
    study.set_user_attr(LATENCY_MIXED_ATTR, True)
    archs, logs = _retime_logs(study, points, data, logged)
    assert archs == {} and logs == ["latency: not re-timed (the study mixes latency devices: --allow-mixed-latency)"]
    assert LATENCY_RETIME_ATTR not in study.user_attrs


def test_no_retiming_on_another_latency_device(data: DataSplits, logged: Logged) -> None:
    study, points = make_study(data, LatencyMeter("onnxruntime", "cpu"))
    study.set_user_attr(LATENCY_DEVICE_ATTR, "cpu-another-machine-onnxruntime")  # pinned by another machine
    archs, logs = _retime_logs(study, points, data, logged)
    assert archs == {} and LATENCY_RETIME_ATTR not in study.user_attrs
    assert len(logs) == 1 and "the front is not re-timed on this machine" in logs[0]
    assert "cpu-another-machine-onnxruntime" in logs[0]


def test_no_retiming_where_the_recorded_runtime_cannot_run(data: DataSplits, logged: Logged) -> None:
    study, points = make_study(data, LatencyMeter("onnxruntime", "cpu"))
    study.set_user_attr(LATENCY_SETTINGS_ATTR, {**study.user_attrs[LATENCY_SETTINGS_ATTR], "runtime": "tvm"})
    archs, logs = _retime_logs(study, points, data, logged)
    assert archs == {} and len(logs) == 1 and logs[0].startswith("latency: not re-timed here (")
    assert "tvm" in logs[0]


def test_students_of_another_data_shape_are_left_alone(data: DataSplits, logged: Logged) -> None:
    # The trials' students were resolved for 16-pixel digits; with 24-pixel data their keys no longer match.
    study, points = make_study(data, LatencyMeter("onnxruntime", "cpu"))
    bigger = load_dataset("digits", input_size=24, seed=0, train_limit=96)
    assert _retime_logs(study, points, bigger, logged) == ({}, [])
    assert LATENCY_RETIME_ATTR not in study.user_attrs

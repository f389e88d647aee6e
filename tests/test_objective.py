"""run_trial (autokd.objective) on a tiny real study: each way a trial ends, recorded in the study and its run."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from autokd.config import SearchSettings
from autokd.latency.meter import LatencyMeter, LatencyResult
from autokd.model.data import TrainViews, load_dataset
from autokd.model.space import load_space
from autokd.model.students import available_families, resolve_student
from autokd.search import objective, trial_latency
from autokd.search.objective import TrialContext, run_trial
from autokd.study.record import sampled_params, trial_state
from autokd.tracking import Tracker, TrialRun

optuna.logging.set_verbosity(optuna.logging.WARNING)

# One tiny architecture, one epoch, no teacher (plain cross-entropy): a trial trains in about a second.
SPACE = """
name: unit
epochs: 1
input_size: 16
students:
  width: 0.25
  depth: 0.25
  families: [resnet]
losses:
  ce: {}
optimizer:
  name: adamw
  lr: {low: 0.001, high: 0.01, log: true}
  weight_decay: 0.0001
batch_size: 32
"""


class RecordingRun(TrialRun):
    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        self.ended: list[tuple[str, str | None]] = []

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def end(self, state: str, reason: str | None = None) -> None:
        self.ended.append((state, reason))


class RecordingTracker(Tracker):
    def __init__(self) -> None:
        super().__init__("unit")
        self.runs: dict[int, RecordingRun] = {}

    def start_trial(self, parent_run_id: str | None, trial_number: int, params: dict[str, object],
                    tags: dict[str, str]) -> TrialRun:
        self.runs[trial_number] = RecordingRun()
        return self.runs[trial_number]


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    return load_dataset("digits", input_size=16, seed=0, train_limit=96)


def context(tmp_path: Path, data, **overrides: object) -> TrialContext:  # type: ignore[no-untyped-def]
    path = tmp_path / "unit.yaml"
    path.write_text(SPACE)
    space = load_space(path)
    base = dict(settings=SearchSettings(device="cpu"), space=space, data=data, teacher_outputs=None,
                teacher_arch="none", views=TrainViews(num_views=space.views),
                latency=LatencyMeter("onnxruntime", "cpu", rounds=3, runs=2, warmup=1), tracker=RecordingTracker(),
                parent_run_id=None, trials_dir=tmp_path / "trials", device="cpu")
    base.update(overrides)
    return TrialContext(**base)  # type: ignore[arg-type]


def new_study() -> optuna.Study:
    return optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))


def test_complete_trial(tmp_path: Path, data, timed_onnx: list) -> None:  # type: ignore[no-untyped-def]
    study, ctx = new_study(), context(tmp_path, data)
    outcome = run_trial(study, study.ask(), ctx)
    ft = study.trials[0]
    assert outcome.state == "COMPLETE" and trial_state(ft) == "COMPLETE" and ft.state == TrialState.COMPLETE
    assert ft.values == [outcome.val_acc, outcome.latency_ms] and outcome.epochs_trained == 1
    assert ft.user_attrs["autokd_state"] == "COMPLETE"
    assert ft.user_attrs["checkpoint"] == str(tmp_path / "trials" / "0")
    assert (tmp_path / "trials" / "0" / "config.json").is_file()
    assert len(ft.user_attrs["curve"]) == 1 and ft.user_attrs["latency"]["median_ms"] == outcome.latency_ms
    assert sampled_params(ft.user_attrs)["family"] == "resnet" and ft.user_attrs["arch_key"]
    assert ctx.tracker.runs[0].ended == [("COMPLETE", None)]
    assert len(timed_onnx) == len(available_families()) + 1  # the anchor panel, then the student once
    assert {"sample_s", "build_s", "latency_s", "tracking_s", "train_s", "save_s"} <= set(outcome.timings)


class ProvisionalLatency:
    """A latency source whose first figure is provisional (taken in a slow phase of the host): still provisional
    after each probe, settled by the wait before the trial's values are told."""

    def __init__(self) -> None:
        self.waits: list[tuple[str, float]] = []
        self.forgotten: list[str] = []

    def measure(self, spec, model=None, max_wait_s=None):  # type: ignore[no-untyped-def]
        self.waits.append(("measure", max_wait_s))
        return LatencyResult(median_ms=9.0, iqr_ms=0.0, runs=10, batch_size=1, threads=1, device="cpu", host="h",
                             params=1, macs=1, key=spec.key, settled=False, slow_rounds=40), False

    def refine(self, spec, max_wait_s, probe=False):  # type: ignore[no-untyped-def]
        self.waits.append(("probe" if probe else "refine", max_wait_s))
        settled = max_wait_s >= trial_latency.FINAL_WAIT_S
        return LatencyResult(median_ms=5.0 if settled else 8.0, iqr_ms=0.0, runs=10, batch_size=1, threads=1,
                             device="cpu", host="h", params=1, macs=1, key=spec.key, settled=settled)

    def close(self, spec, result=None):  # type: ignore[no-untyped-def]
        self.forgotten.append(spec.key)
        return result


def test_a_provisional_latency_is_probed_while_training_and_settled_before_the_values_are_told(
        tmp_path: Path, data, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(objective, "PROBE_EVERY_S", 1e9)  # probes at epoch ends only: a fixed sequence
    path = tmp_path / "two.yaml"
    path.write_text(SPACE.replace("epochs: 1", "epochs: 2") + "pruning:\n  min_epoch: 1\n  eta: 2\n")
    source = ProvisionalLatency()
    study = new_study()
    ctx = context(tmp_path, data, space=load_space(path), latency=source)
    outcome = run_trial(study, study.ask(), ctx)
    ft = study.trials[0]
    assert outcome.state == "COMPLETE" and outcome.epochs_trained == 2
    # first measured briefly, probed after each epoch, then waited for before the tell
    assert source.waits == [("measure", trial_latency.FIRST_WAIT_S), ("probe", 0.0), ("probe", 0.0),
                            ("refine", trial_latency.FINAL_WAIT_S)]
    # the rung's decision used the provisional figure of that moment, and says so
    assert ft.user_attrs["rung_1"]["latency_ms"] == 8.0 and ft.user_attrs["rung_1"]["latency_settled"] is False
    # the told value and the recorded figure are the settled one
    assert ft.values[1] == outcome.latency_ms == 5.0
    assert ft.user_attrs["latency"]["median_ms"] == 5.0 and ft.user_attrs["latency"]["settled"] is True
    assert ft.user_attrs["latency"]["refinements"] == 3 and source.forgotten == [ft.user_attrs["arch_key"]]


def test_infeasible_trial_is_measured_but_never_trained(tmp_path: Path, data,  # type: ignore[no-untyped-def]
                                                        timed_onnx: list) -> None:
    study, ctx = new_study(), context(tmp_path, data, settings=SearchSettings(device="cpu", max_latency_ms=1e-6))
    outcome = run_trial(study, study.ask(), ctx)
    ft = study.trials[0]
    assert outcome.state == "INFEASIBLE" and outcome.reason.startswith("latency ")
    assert outcome.reason.endswith("ms > --max-latency-ms 1e-06")
    assert ft.state == TrialState.PRUNED and trial_state(ft) == "INFEASIBLE"
    assert ft.user_attrs["autokd_state"] == "INFEASIBLE" and ft.user_attrs["infeasible_reason"] == outcome.reason
    assert "curve" not in ft.user_attrs and "latency" in ft.user_attrs
    assert len(timed_onnx) == len(available_families()) + 1  # the anchor panel, then the student once
    assert not (tmp_path / "trials").exists()
    assert ctx.tracker.runs[0].ended == [("INFEASIBLE", outcome.reason)]


def test_an_error_fails_the_trial_with_its_traceback(tmp_path: Path, data,  # type: ignore[no-untyped-def]
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(objective, "distill", boom)
    study, ctx = new_study(), context(tmp_path, data)
    outcome = run_trial(study, study.ask(), ctx)
    ft = study.trials[0]
    assert outcome.state == "FAIL" and outcome.reason == "error: RuntimeError: boom"
    assert ft.state == TrialState.FAIL and len(study.trials) == 1  # a failure is not retried
    assert ft.user_attrs["autokd_state"] == "FAIL" and ft.user_attrs["fail_reason"] == outcome.reason
    assert "RuntimeError: boom" in ft.user_attrs["traceback"]
    run = ctx.tracker.runs[0]
    assert run.ended == [("FAIL", outcome.reason)] and "RuntimeError: boom" in run.tags["autokd.traceback"]


def test_an_interrupt_requeues_the_trial_and_propagates(tmp_path: Path, data,  # type: ignore[no-untyped-def]
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*args: object, **kwargs: object) -> None:
        raise objective.Interrupted("signal 15")

    monkeypatch.setattr(objective, "distill", interrupt)
    study, ctx = new_study(), context(tmp_path, data)
    with pytest.raises(objective.Interrupted):
        run_trial(study, study.ask(), ctx)
    first, retry = study.trials
    assert first.state == TrialState.FAIL and first.user_attrs["autokd_state"] == "INTERRUPTED"
    assert first.user_attrs["fail_reason"] == "interrupted (Ctrl-C / SIGTERM)" and first.user_attrs["requeued"]
    assert retry.state == TrialState.WAITING and retry.user_attrs == {"retry_of": 0}
    assert ctx.tracker.runs[0].ended == [("INTERRUPTED", "interrupted")]


def test_a_fatal_error_requeues_the_trial_and_propagates(tmp_path: Path, data,  # type: ignore[no-untyped-def]
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def unwritable(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(objective, "write_checkpoint", unwritable)
    study, ctx = new_study(), context(tmp_path, data)
    with pytest.raises(objective.FatalSearchError, match="cannot write the checkpoint of trial 0"):
        run_trial(study, study.ask(), ctx)
    first, retry = study.trials
    assert first.state == TrialState.FAIL and first.user_attrs["autokd_state"] == "FAIL"
    assert "No space left on device" in first.user_attrs["fail_reason"] and first.user_attrs["requeued"]
    assert "traceback" not in first.user_attrs
    assert retry.user_attrs == {"retry_of": 0}
    state, reason = ctx.tracker.runs[0].ended[0]
    assert state == "FAIL" and reason == first.user_attrs["fail_reason"]


def test_stopwatch_sections_leave_out_their_inner_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trial's figures add up: time in a section inside another counts once, in the inner one; a section the
    block leaves by raising (a pruned trial) is timed too; a name timed twice adds up; elapsed() is everything."""
    now = [0.0]
    monkeypatch.setattr(objective, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    watch = objective.Stopwatch()
    with watch.section("train_s"):
        now[0] += 5.0
        with watch.section("epoch_bookkeeping_s"):
            now[0] += 2.0
            with watch.section("tracking_s"):
                now[0] += 1.0
    with pytest.raises(optuna.TrialPruned), watch.section("tracking_s"):
        now[0] += 0.5
        raise optuna.TrialPruned
    assert watch.times == {"train_s": 5.0, "epoch_bookkeeping_s": 2.0, "tracking_s": 1.5}
    assert watch.elapsed() == 8.5


def test_a_probe_stops_once_its_source_has_nothing_more_to_take() -> None:
    # A source with no open measurement (closed, remote, eager PyTorch) answers a refine with None: the trial
    # stops probing it instead of asking on every training step.
    class Closed(ProvisionalLatency):
        def refine(self, spec, max_wait_s, probe=False):  # type: ignore[no-untyped-def]
            self.waits.append(("probe" if probe else "refine", max_wait_s))

    source = Closed()
    spec = resolve_student("resnet", 0.25, 0.25, 10, 1, 8)
    tracked = trial_latency.TrialLatency(source, spec)
    tracked.measure(None)
    assert tracked.probe_due(0.0) and not tracked.probe(0.0)
    assert not tracked.probe_due(0.0) and tracked.done
    assert source.waits == [("measure", trial_latency.FIRST_WAIT_S), ("probe", 0.0)]

"""Latency runtimes (ONNX Runtime, eager PyTorch) behind one LatencyMeter (the protocol itself: test_latency_protocol)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autokd.errors import UserError
from autokd.latency import protocol as ort_timing
from autokd.latency.meter import LatencyCache, LatencyMeter, LatencyResult, default_runtime
from autokd.model.students import available_families, build_from_spec, resolve_student

FAST = dict(rounds=5, runs=2, warmup=1)  # the protocol's shape, small enough for a unit test


def tiny_spec(family: str = "resnet", width: float = 0.25):
    return resolve_student(family, width, 0.25, num_classes=3, in_chans=1, input_size=16)


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_meter_times_a_tiny_student_in_each_runtime(runtime: str, tmp_path: Path) -> None:
    spec = tiny_spec()
    meter = LatencyMeter(runtime, cache=LatencyCache(tmp_path), **FAST)
    model = build_from_spec(spec).train()
    rng_before = torch.random.get_rng_state()
    result, hit = meter.measure(spec, model)
    assert not hit and model.training  # the trial's module is left as it was, and so is its random stream
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    # a settled figure uses every round taken in a fast phase: more than 5 when it waited out a slow one
    assert result.runtime == runtime and result.rounds >= 5 and result.runs == 2 * result.rounds
    assert result.low_ms <= result.median_ms <= result.high_ms  # type: ignore[operator]
    assert result.high_ms - result.low_ms >= 0.03 * result.median_ms  # type: ignore[operator] - >= +-2 % floor
    assert result.params == sum(p.numel() for p in model.parameters()) and result.macs > 0
    assert (result.export_s > 0) == (runtime == "onnxruntime")
    again, hit = meter.measure(spec)
    assert hit and again == result
    assert (tmp_path / meter.signature() / f"{spec.key}.json").is_file()


def test_signature_names_runtime_version_provider_and_threads() -> None:
    ort_meter, torch_meter = LatencyMeter("onnxruntime"), LatencyMeter("torch", threads=2)
    info = ort_meter.signature_info()
    assert info["runtime"] == "onnxruntime" and info["version"] == ort_timing.ort.__version__
    assert info["provider"] == "CPUExecutionProvider" and info["threads"] == 1 and info["batch"] == 1
    assert "onnxruntime" in ort_meter.signature() and ort_meter.signature().endswith("-cpu-fp32")
    assert "-t2-torch-" in torch_meter.signature()
    assert ort_meter.signature() != LatencyMeter("onnxruntime", threads=2).signature()
    assert default_runtime("cpu") == "onnxruntime"
    with pytest.raises(UserError, match="--latency-runtime 'tvm'"):
        LatencyMeter("tvm")


def test_meter_times_an_exported_onnx_file(tmp_path: Path) -> None:
    # Issue 15 times an INT8 ONNX file instead of the fp32 export: the meter takes ONNX bytes or a path.
    spec = tiny_spec()
    meter = LatencyMeter("onnxruntime", batch=2, **FAST)
    blob = meter.export(build_from_spec(spec), (1, 16, 16))
    path = tmp_path / "m.onnx"
    path.write_bytes(blob)
    for source in (blob, path):
        r = meter.time_onnx(source, key="m")
        assert isinstance(r, LatencyResult) and r.median_ms > 0 and r.batch_size == 2 and r.runtime == "onnxruntime"
    with pytest.raises(ValueError, match="onnxruntime"):
        LatencyMeter("torch").time_onnx(blob)


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_retime_interleaves_several_students(runtime: str) -> None:
    specs = {"small": tiny_spec(width=0.25), "vit": tiny_spec("vit", width=0.5)}
    out = LatencyMeter(runtime, **FAST).retime(specs)
    assert set(out) == {"small", "vit"}
    for name, r in out.items():
        assert r.key == specs[name].key and r.rounds >= 5 and r.runtime == runtime
        assert r.low_ms <= r.median_ms <= r.high_ms  # type: ignore[operator]


def test_int8_precision_times_the_quantised_model(tmp_path: Path, timed_onnx: list) -> None:
    # --latency-precision int8: what the meter hands ONNX Runtime is the INT8 (QDQ) model, both for a trial's
    # measurement and for the front's re-timing; fp32 and int8 figures live under different signatures.
    from autokd.latency.quantize import quantized_op_counts

    timed = timed_onnx
    spec = tiny_spec()
    fp32 = LatencyMeter("onnxruntime", cache=LatencyCache(tmp_path), **FAST)
    q = LatencyMeter("onnxruntime", cache=LatencyCache(tmp_path), precision="INT8", **FAST)
    assert q.precision == "int8" and fp32.signature().endswith("-fp32")
    assert q.signature() == fp32.signature()[:-len("fp32")] + "int8"
    assert q.signature_info() == {**fp32.signature_info(), "precision": "int8"}
    assert fp32.signature_info()["precision"] == "fp32" and "int8 model" in q.describe()

    result, hit = q.measure(spec, build_from_spec(spec))
    assert not hit and result.precision == "int8" and result.export_s > 0 and result.quantize_s > 0
    panel = len(available_families())  # the anchors timed beside students (autokd.latency.anchors): INT8 too
    assert len(timed) == panel + 1 and all(quantized_op_counts(b).get("QuantizeLinear", 0) > 0 for b in timed)
    assert LatencyResult.from_dict(result.to_dict()) == result
    assert (tmp_path / q.signature() / f"{spec.key}.json").is_file()
    assert q.measure(spec) == (result, True)

    r32, hit = fp32.measure(spec)  # the same student, another cache entry: its fp32 model
    assert not hit and r32.precision == "fp32" and r32.quantize_s == 0.0
    assert len(timed) == 2 * (panel + 1) and all(quantized_op_counts(b) == {} for b in timed[panel + 1:])

    timed.clear()
    out = q.retime({"a": spec, "b": tiny_spec("vit", width=0.5)})
    assert {r.precision for r in out.values()} == {"int8"} and len(timed) == 2
    assert all(quantized_op_counts(b).get("DequantizeLinear", 0) > 0 for b in timed)
    assert LatencyResult.from_dict({k: v for k, v in r32.to_dict().items() if k != "precision"}).precision == "fp32"


def test_int8_precision_needs_onnxruntime() -> None:
    with pytest.raises(UserError, match=r"--latency-precision int8 .* needs --latency-runtime onnxruntime "
                                        r"\(got 'torch'\)"):
        LatencyMeter("torch", precision="int8")
    with pytest.raises(UserError, match="--latency-precision 'fp16'"):
        LatencyMeter("onnxruntime", precision="fp16")


def test_the_study_record_keeps_the_first_measurement_of_each_architecture(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """On a storage several machines share, `StudyLatency` wraps each worker's meter: the first measurement of an
    architecture recorded in the study is the one every worker uses."""
    import dataclasses

    import optuna

    from autokd.latency.pinning import StudyLatency

    study = optuna.create_study(directions=["maximize", "minimize"])
    spec = tiny_spec()
    result, hit = StudyLatency(study, LatencyMeter("torch", cache=LatencyCache(tmp_path / "a"), **FAST)).measure(spec)
    assert not hit
    other = StudyLatency(study, LatencyMeter("torch", cache=LatencyCache(tmp_path / "b"), **FAST))
    again, hit = other.measure(spec)  # another machine of the same kind: the study's figure, nothing timed there
    assert hit and again == result and not (tmp_path / "b").exists()

    wider = tiny_spec(width=0.5)
    theirs = dataclasses.replace(result, key=wider.key, median_ms=123.0)

    def measured_while_another_recorded(spec: object, model: object = None,
                                        max_wait_s: object = None) -> tuple[LatencyResult, bool]:
        other.put(wider.key, theirs)  # another worker records its measurement meanwhile
        return dataclasses.replace(result, key=wider.key), False

    monkeypatch.setattr(other.meter, "measure", measured_while_another_recorded)
    assert other.measure(wider) == (theirs, False)
    assert other.refine(wider, 0.0, probe=3) is None  # recorded: not refined further on this worker


def test_study_latency_records_one_figure_when_two_workers_put_at_once(tmp_path: Path) -> None:
    # Two workers that measured the same architecture at the same time: with the study lock, the second one's
    # "record unless recorded" sees the first one's figure and adopts it (both then use one latency).
    import threading

    import optuna

    from autokd.latency.pinning import StudyLatency
    from autokd.utils.locks import file_lock

    study = optuna.create_study(directions=["maximize", "minimize"])
    meter = LatencyMeter("onnxruntime", cache=LatencyCache(tmp_path), **FAST)
    lock = lambda: file_lock(tmp_path / "study.lock")  # noqa: E731
    results: list[LatencyResult] = []
    start = threading.Barrier(2)

    def worker(ms: float) -> None:
        shared = StudyLatency(study, meter, lock=lock)
        start.wait()
        results.append(shared.put("arch", LatencyResult(median_ms=ms, iqr_ms=0.0, runs=1, batch_size=1, threads=1,
                                                        device="cpu", host="h", params=0, macs=0, key="arch")))

    threads = [threading.Thread(target=worker, args=(ms,)) for ms in (1.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2 and results[0].median_ms == results[1].median_ms
    assert StudyLatency(study, meter).get("arch").median_ms == results[0].median_ms


def test_a_trial_measurement_stays_open_for_more_moments_until_closed(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Every round counts here (the host-phase gate tolerates anything): what is tested is the bookkeeping.
    monkeypatch.setattr(ort_timing.GATE, "tolerance", 1e9)
    meter = LatencyMeter("onnxruntime", cache=LatencyCache(tmp_path), **FAST)
    spec = tiny_spec()
    first, hit = meter.measure(spec, max_wait_s=0.0)
    assert not hit and first.settled and first.moments == 1 and first.runs == 5 * 2
    assert meter.cache.get(spec.key, meter.signature()) == first  # settled: cached at once
    refined = meter.refine(spec, 0.0, probe=3)  # a probe while the trial trains: 3 more rounds, a second moment
    assert refined is not None and refined.settled and refined.moments == 2 and refined.runs == (5 + 3) * 2
    assert meter.cache.get(spec.key, meter.signature()) == refined  # the cache follows the refined figure
    assert meter.close(spec, refined) == refined
    assert meter.refine(spec, 0.0, probe=3) is None  # closed: nothing more is taken
    again, hit = meter.measure(spec)
    assert hit and again == refined  # a later trial of the architecture uses the final figure

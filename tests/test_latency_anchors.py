"""Anchored latency: a student timed beside its family's anchor, its figure scaled by the anchor's panel figure."""
from __future__ import annotations

from pathlib import Path

import pytest

from autokd.latency import protocol as ort_timing
from autokd.latency.anchors import ANCHOR_MULTIPLIER, anchor_spec
from autokd.latency.meter import LatencyCache, LatencyMeter, LatencyResult
from autokd.model.students import available_families, build_from_spec, resolve_student

FAST = dict(rounds=5, runs=2, warmup=1)  # the protocol's shape, small enough for a unit test


def tiny_spec(family: str = "resnet", width: float = 0.25):
    return resolve_student(family, width, 0.25, num_classes=3, in_chans=1, input_size=16)


def test_every_registered_family_has_an_anchor_of_the_students_shape() -> None:
    like = tiny_spec()
    for family in available_families():
        spec = anchor_spec(family, like)
        assert spec.family == family and spec.width == spec.depth == ANCHOR_MULTIPLIER
        assert (spec.num_classes, spec.in_chans, spec.input_size) == (3, 1, 16)


def test_a_student_is_timed_beside_its_family_anchor_and_scaled_by_the_panel(tmp_path: Path,
                                                                            timed_onnx: list) -> None:
    meter = LatencyMeter("onnxruntime", cache=LatencyCache(tmp_path), **FAST)
    spec = tiny_spec("vit", 0.6)
    result, hit = meter.measure(spec, build_from_spec(spec))
    assert not hit and result.anchor == anchor_spec("vit", spec).key
    assert 0 < result.own_ms and 0 < result.anchor_ms and 0 < result.anchor_panel_ms
    assert result.median_ms == pytest.approx(result.own_ms / result.anchor_ms * result.anchor_panel_ms)
    low, high = result.interval
    assert low <= result.median_ms <= high
    assert LatencyResult.from_dict(result.to_dict()) == result
    # the panel (every family's anchor) was exported and timed once, then the student
    assert len(timed_onnx) == len(available_families()) + 1

    # the panel's figures are cached like students': each anchor is also a student a trial may sample
    for family in available_families():
        aspec = anchor_spec(family, spec)
        cached = meter.cache.get(aspec.key, meter.signature())
        assert cached is not None and cached.params > 0 and cached.macs > 0 and cached.anchor == ""
        if family == "vit":
            assert cached.median_ms == result.anchor_panel_ms

    # another student of another family: the panel is not timed again
    other = tiny_spec("convnext", 0.3)
    found, _ = meter.measure(other)
    assert found.anchor == anchor_spec("convnext", other).key and len(timed_onnx) == len(available_families()) + 2


def test_a_second_meter_on_the_same_cache_uses_the_cached_panel(tmp_path: Path, timed_onnx: list) -> None:
    first = LatencyMeter("onnxruntime", cache=LatencyCache(tmp_path), **FAST)
    a, _ = first.measure(tiny_spec("resnet", 0.3))
    timed_onnx.clear()
    second = LatencyMeter("onnxruntime", cache=LatencyCache(tmp_path), **FAST)  # a later search on this cache
    b, hit = second.measure(tiny_spec("resnet", 0.4))
    assert not hit and b.anchor == a.anchor and b.anchor_panel_ms == a.anchor_panel_ms
    # the anchors are exported again (to run them), but the panel is not re-timed: its figures come from the cache
    assert len(timed_onnx) == len(available_families()) + 1


def test_the_anchor_architecture_itself_is_the_panel_figure(tmp_path: Path) -> None:
    meter = LatencyMeter("onnxruntime", cache=LatencyCache(tmp_path), **FAST)
    meter.measure(tiny_spec("resnet", 0.3))
    spec = anchor_spec("regnet", tiny_spec())
    result, hit = meter.measure(spec)
    assert hit and result.anchor == "" and result.key == spec.key

    # A search whose first trial samples an anchor: the panel is timed, the trial gets the anchor's panel figure
    # (not a second, lone timing of it), and the cache keeps the panel's figure.
    first = LatencyMeter("onnxruntime", cache=LatencyCache(tmp_path / "first"), **FAST)
    result, hit = first.measure(spec)
    panel = first.anchor_for(spec)
    assert not hit and panel is not None and panel.key == spec.key and result.anchor == ""
    assert result.median_ms == panel.panel_ms and result.params > 0 and result.macs > 0
    assert first.cache.get(spec.key, first.signature()).median_ms == panel.panel_ms
    assert first.refine(spec, 0.0, probe=3) is None  # nothing was left open to refine

    uncached = LatencyMeter("onnxruntime", **FAST)  # no cache: the same
    alone, hit = uncached.measure(spec)
    assert not hit and alone.median_ms == uncached.anchor_for(spec).panel_ms


def test_an_unsettled_panel_is_cached_so_every_later_meter_uses_one_scale(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort_timing.GATE, "tolerance", -1.0)  # no round counts: nothing settles
    meter = LatencyMeter("onnxruntime", cache=LatencyCache(tmp_path), max_wait_s=0.0, **FAST)
    result, _ = meter.measure(tiny_spec("resnet", 0.3), max_wait_s=0.0)
    assert not result.settled and result.anchor
    cached = meter.cache.get(result.anchor, meter.signature())
    assert cached is not None and not cached.settled and cached.median_ms == result.anchor_panel_ms
    later = LatencyMeter("onnxruntime", cache=LatencyCache(tmp_path), max_wait_s=0.0, **FAST)
    again, _ = later.measure(tiny_spec("resnet", 0.4), max_wait_s=0.0)
    assert again.anchor == result.anchor and again.anchor_panel_ms == result.anchor_panel_ms


def test_a_panel_that_cannot_be_timed_leaves_students_timed_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    real_take = ort_timing.Measurement.take

    def take(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if len(self.runners) > 2:  # the panel (three anchors), not a student beside one
            raise RuntimeError("the panel broke")
        return real_take(self, *args, **kwargs)

    monkeypatch.setattr(ort_timing.Measurement, "take", take)
    meter = LatencyMeter("onnxruntime", anchor_families=["resnet", "vit", "convnext"], **FAST)
    with caplog.at_level("WARNING"):
        first, _ = meter.measure(tiny_spec("vit", 0.6))
        second, _ = meter.measure(tiny_spec("resnet", 0.4))
    assert first.anchor == second.anchor == "" and first.median_ms > 0 and second.median_ms > 0
    assert caplog.text.count("the latency anchors could not be timed (RuntimeError: the panel broke)") == 1


def test_refined_figures_stay_anchored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort_timing.GATE, "tolerance", 1e9)  # every round counts: the bookkeeping is tested
    meter = LatencyMeter("onnxruntime", cache=LatencyCache(tmp_path), **FAST)
    spec = tiny_spec("mobilenetv3", 0.4)
    first, _ = meter.measure(spec, max_wait_s=0.0)
    refined = meter.refine(spec, 0.0, probe=3)
    assert refined is not None and refined.moments == 2 and refined.runs == (5 + 3) * 2
    assert refined.anchor == first.anchor != "" and refined.anchor_panel_ms == first.anchor_panel_ms
    assert refined.median_ms == pytest.approx(refined.own_ms / refined.anchor_ms * refined.anchor_panel_ms)


@pytest.mark.parametrize("how", ["torch", "not anchored"])
def test_eager_pytorch_and_an_unanchored_meter_time_the_student_alone(how: str, tmp_path: Path) -> None:
    meter = (LatencyMeter("torch", **FAST) if how == "torch"
             else LatencyMeter("onnxruntime", anchored=False, **FAST))
    result, _ = meter.measure(tiny_spec())
    assert result.anchor == "" and result.own_ms == 0.0 and not meter.anchored


def test_the_panel_holds_the_given_families_only(tmp_path: Path, timed_onnx: list) -> None:
    meter = LatencyMeter("onnxruntime", cache=LatencyCache(tmp_path), anchor_families=["resnet", "vit"], **FAST)
    result, _ = meter.measure(tiny_spec("vit", 0.6))
    assert result.anchor == anchor_spec("vit", tiny_spec()).key and len(timed_onnx) == 2 + 1
    alone, _ = meter.measure(tiny_spec("convnext", 0.3))  # a family without an anchor in the panel
    assert alone.anchor == "" and len(timed_onnx) == 2 + 2


def test_a_family_whose_anchor_cannot_be_built_is_timed_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import autokd.latency.meter as meter_module

    def no_vit(family: str, like):  # type: ignore[no-untyped-def]
        if family == "vit":
            raise ValueError("no anchor here")
        return anchor_spec(family, like)

    monkeypatch.setattr(meter_module, "anchor_spec", no_vit)
    meter = LatencyMeter("onnxruntime", cache=LatencyCache(tmp_path), anchor_families=["resnet", "vit"], **FAST)
    with caplog.at_level("WARNING"):
        result, _ = meter.measure(tiny_spec("vit", 0.6))
    assert result.anchor == "" and result.median_ms > 0
    assert "no latency anchor for family 'vit' (ValueError: no anchor here)" in caplog.text
    assert meter.measure(tiny_spec("resnet", 0.4))[0].anchor == anchor_spec("resnet", tiny_spec()).key

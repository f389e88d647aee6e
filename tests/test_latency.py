from __future__ import annotations

import json
import multiprocessing as mp
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import autokd.latency.meter as latency
from autokd.errors import UserError
from autokd.latency.meter import (
    LatencyCache,
    LatencyMeter,
    LatencyResult,
    count_macs,
    device_signature,
)
from autokd.model.students import available_families, build_from_spec, resolve_student


def result(key: str = "resnet-0123456789", median: float = 1.5) -> LatencyResult:
    return LatencyResult(median_ms=median, iqr_ms=0.1, runs=10, batch_size=1, threads=1, device="cpu:test",
                         host="h", params=100, macs=2000, key=key)


# MACs of the default space's corners (16 px, 1 channel), as counted since MACs were first recorded: a count
# that changes would make a study's or a latency cache's stored figures disagree with new trials.
RECORDED_MACS = {
    "convnext": (86432, 755520), "efficientnet": (206096, 945424), "mobilenetv3": (119200, 926112),
    "regnet": (60608, 728048), "resnet": (231552, 2594688), "vit": (108704, 2362848),
}


@pytest.mark.parametrize("family", available_families())
def test_count_macs_matches_recorded_figures(family: str) -> None:
    small, large = RECORDED_MACS[family]
    assert count_macs(build_from_spec(resolve_student(family, 0.25, 0.25, 10, 1, 16)), (1, 16, 16)) == small
    assert count_macs(build_from_spec(resolve_student(family, 0.75, 0.75, 10, 1, 16)), (1, 16, 16)) == large


def test_count_macs_grows_with_width() -> None:
    macs = [count_macs(build_from_spec(resolve_student("resnet", w, 0.25, 10, 1, 16)), (1, 16, 16))
            for w in (0.25, 0.5, 1.0)]
    assert 0 < macs[0] < macs[1] < macs[2]


def test_count_macs_falls_back_to_zero() -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    assert count_macs(Broken(), (1, 4, 4)) == 0


def test_device_signature() -> None:
    sig = device_signature("cpu", 1)
    assert sig == device_signature(torch.device("cpu"), 1)
    assert re.fullmatch(r"cpu-[a-z0-9-]+-t1", sig)
    assert device_signature("cpu", 2).endswith("-t2")
    with pytest.raises(UserError, match="nonsense"):
        device_signature("nonsense", 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_device_signature_without_cuda() -> None:
    with pytest.raises(UserError, match="CUDA is not available"):
        device_signature("cuda", 1)


def test_cache_round_trip(tmp_path: Path) -> None:
    cache = LatencyCache(tmp_path)
    assert cache.get("resnet-0123456789", "cpu-x-t1") is None
    cache.put(result(), "cpu-x-t1")
    assert cache.get("resnet-0123456789", "cpu-x-t1") == result()
    assert cache.get("resnet-0123456789", "cpu-y-t1") is None
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "cpu-x-t1", "cpu-x-t1/resnet-0123456789.json"]
    cache.put(result(median=2.5), "cpu-x-t1")
    assert cache.get("resnet-0123456789", "cpu-x-t1").median_ms == 2.5
    assert LatencyResult.from_dict(json.loads(json.dumps(result().to_dict()))) == result()


def test_cache_treats_a_corrupt_file_as_a_miss(tmp_path: Path) -> None:
    cache = LatencyCache(tmp_path)
    cache.path("vit-1", "sig").parent.mkdir(parents=True)
    cache.path("vit-1", "sig").write_text("{not json")
    assert cache.get("vit-1", "sig") is None


def test_cache_rejects_unsafe_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LatencyCache(tmp_path).path("../escape", "sig")


def _hammer(root: str, n: int, median: float) -> None:
    cache = LatencyCache(Path(root))
    for _ in range(n):
        cache.put(result(median=median), "sig")


def test_cache_concurrent_writers_never_expose_partial_files(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), 100, m)) for m in (1.0, 2.0)]
    for p in procs:
        p.start()
    cache = LatencyCache(tmp_path)
    path = cache.path("resnet-0123456789", "sig")
    seen = set()
    while any(p.is_alive() for p in procs):
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        seen.add(json.loads(text)["median_ms"])  # a half-written file would fail to parse here
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert cache.get("resnet-0123456789", "sig").median_ms in (1.0, 2.0)
    assert seen <= {1.0, 2.0}
    assert [p.name for p in (tmp_path / "sig").iterdir()] == ["resnet-0123456789.json"]


def test_meter_cache_hits_without_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = resolve_student("resnet", 0.25, 0.25, 10, 1, 16)
    cache = LatencyCache(tmp_path)
    meter = LatencyMeter("torch", cache=cache, rounds=3, runs=1, warmup=1)
    first, hit = meter.measure(spec)
    assert not hit and first.key == spec.key and first.macs > 0 and first.median_ms > 0

    def no_build(*_: object) -> nn.Module:
        raise AssertionError("a cache hit must not build the model")

    monkeypatch.setattr(latency, "build_from_spec", no_build)
    second, hit = meter.measure(spec)
    assert hit and second == first
    assert meter.signature().startswith(device_signature("cpu", 1))
    assert (tmp_path / meter.signature() / f"{spec.key}.json").exists()
    with pytest.raises(AssertionError):  # another batch size is another measurement
        LatencyMeter("torch", batch=4, cache=cache, rounds=3, runs=1, warmup=1).measure(spec)

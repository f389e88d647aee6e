"""The ONNX Runtime timing protocol (autokd.latency.protocol): sessions, the shuffled rounds, the statistic and its
interval, the host check, the device signature; on real ONNX Runtime sessions of tiny models."""
from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import repo_pythonpath
from onnx import TensorProto, helper, numpy_helper

from autokd.latency import hostphase
from autokd.latency import protocol as ort_timing

FAST = {"rounds": 5, "runs": 2, "warmup": 1}  # the protocol's shape, small enough for a unit test


def matmul_model(size: int = 16, seed: int = 0) -> bytes:
    """A one-node ONNX model (``y = x @ W``, dynamic batch) with its weight inside the file."""
    weight = numpy_helper.from_array(np.random.default_rng(seed).random((size, size), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", size])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_median_interval_is_the_order_statistic_interval() -> None:
    # n = 15: the 4th and 12th smallest cover the median with probability 1 - 2 P(B(15, 1/2) <= 3) = 0.965
    assert ort_timing.median_interval([float(x) for x in range(15, 0, -1)]) == (4.0, 12.0)
    assert ort_timing.median_interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]) == (2.0, 8.0)
    assert ort_timing.median_interval([2.0, 1.0]) == (1.0, 2.0)  # too few for 95 %: the whole range
    assert ort_timing.widen(1.0, 0.999, 1.001) == pytest.approx((0.98, 1.02))  # the reproducibility floor


def test_ort_timing_imports_neither_torch_nor_timm() -> None:
    # The latency server (issue 14) reuses this module on a target device without torch.
    code = ("import sys, autokd.latency.protocol; bad = [m for m in ('torch', 'timm') if m in sys.modules]; "
            "print(*bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, PYTHONPATH=repo_pythonpath()))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_median_interval_edges_and_widen_keeps_a_wide_interval() -> None:
    assert all(math.isnan(x) for x in ort_timing.median_interval([]))
    assert ort_timing.median_interval([3.0]) == (3.0, 3.0)
    # Its coverage: the binomial probability of the order statistics it picks is at least the confidence asked.
    for n in (6, 10, 15, 31):
        xs = [float(x) for x in range(n)]
        low, high = ort_timing.median_interval(xs)
        k = int(low)
        assert high == n - 1 - k
        coverage = 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
        assert coverage >= ort_timing.CONFIDENCE
        assert ort_timing.median_interval(xs, confidence=0.5)[0] >= low  # less confidence, a narrower interval
    assert ort_timing.widen(1.0, 0.5, 1.5) == (0.5, 1.5)  # wider than the floor: unchanged
    assert ort_timing.widen(2.0, 1.99, 2.01, rel=0.1) == pytest.approx((1.8, 2.2))


def test_timing_spread_is_the_interquartile_range() -> None:
    assert ort_timing.Timing(3.0, 1.0, 5.0, rounds=[1.0, 2.0, 3.0, 4.0, 5.0]).spread_ms == pytest.approx(2.0)
    assert ort_timing.Timing(3.0, 3.0, 3.0, rounds=[3.0]).spread_ms == 0.0


def test_signature_names_device_runtime_version_provider_threads() -> None:
    sig = ort_timing.signature(2)
    assert sig == {"device": f"cpu:{ort_timing.cpu_model()}", "runtime": "onnxruntime",
                   "version": ort_timing.ort.__version__, "provider": "CPUExecutionProvider", "threads": 2}
    assert ort_timing.signature(1, device="cuda:NVIDIA H200")["device"] == "cuda:NVIDIA H200"
    assert isinstance(ort_timing.cpu_model(), str) and ort_timing.cpu_model()
    assert ort_timing.DEFAULT_PROVIDER in ort_timing.available_providers()


def test_session_from_bytes_or_path_runs_the_model(tmp_path: Path) -> None:
    blob = matmul_model()
    path = tmp_path / "m.onnx"
    path.write_bytes(blob)
    weight = numpy_helper.to_array(onnx.load_from_string(blob).graph.initializer[0])
    for source in (blob, path, str(path)):
        session = ort_timing.make_session(source, threads=1)
        feed = ort_timing.make_input(session, batch=3, seed=1)
        [x] = feed.values()
        assert x.shape == (3, 16) and x.dtype == np.float32  # the dynamic batch axis takes the batch asked
        np.testing.assert_allclose(session.run(None, feed)[0], x @ weight, rtol=1e-5)
    again = ort_timing.make_input(ort_timing.make_session(blob), batch=3, seed=1)
    np.testing.assert_array_equal(next(iter(again.values())), x)  # the same seed, the same input
    assert ort_timing.make_session(blob, threads=None).get_providers() == ["CPUExecutionProvider"]


def test_every_input_is_built_once_in_its_own_dtype() -> None:
    kinds = [("x", TensorProto.FLOAT16, ["batch", 4]), ("ids", TensorProto.INT64, ["batch", 3]),
             ("mask", TensorProto.BOOL, ["batch", 2]), ("d", TensorProto.DOUBLE, ["batch", "n"])]
    graph = helper.make_graph(
        [helper.make_node("Identity", [name], [f"{name}_out"]) for name, _, _ in kinds], "g",
        [helper.make_tensor_value_info(name, kind, shape) for name, kind, shape in kinds],
        [helper.make_tensor_value_info(f"{name}_out", kind, shape) for name, kind, shape in kinds])
    blob = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    session = ort_timing.make_session(blob, threads=1)
    specs = ort_timing.input_specs(session, batch=5)
    assert specs == [("x", (5, 4), np.float16), ("ids", (5, 3), np.int64), ("mask", (5, 2), np.bool_),
                     ("d", (5, 1), np.float64)]  # the first axis takes the batch, other dynamic axes 1
    feed = ort_timing.make_input(session, batch=5)
    assert {name: (a.shape, a.dtype) for name, a in feed.items()} == {n: (sh, np.dtype(dt)) for n, sh, dt in specs}
    assert set(np.unique(feed["ids"])) <= {0, 1} and feed["x"].std() > 0
    session.run(None, feed)
    # Built in place: a float32 input never exists as float64 first (that took 3 times its size).
    import tracemalloc

    tracemalloc.start()
    try:
        [big] = ort_timing.make_inputs([("x", (1, 4 * 2**20), np.dtype(np.float32))]).values()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert big.dtype == np.float32 and peak < 1.5 * big.nbytes


def test_an_unavailable_provider_is_refused_naming_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"'NoSuchExecutionProvider' is not available here; available: .*"
                                         r"CPUExecutionProvider"):
        ort_timing.make_session(matmul_model(), provider="NoSuchExecutionProvider")


def test_time_sessions_times_each_session_in_every_round() -> None:
    sessions = {"small": ort_timing.make_session(matmul_model(8)), "large": ort_timing.make_session(matmul_model(256))}
    out = ort_timing.time_sessions(sessions, batch=2, rounds=7, runs=3, warmup=1, gate=None)
    assert set(out) == {"small", "large"}
    for timing in out.values():
        assert len(timing.rounds) == 7 and timing.runs_per_round == 3
        assert timing.median_ms == statistics.median(timing.rounds) > 0
        assert timing.low_ms <= timing.median_ms <= timing.high_ms
        assert (timing.low_ms, timing.high_ms) == pytest.approx(
            ort_timing.widen(timing.median_ms, *ort_timing.median_interval(timing.rounds)))
        assert timing.seconds > 0 and timing.settled and timing.slow_rounds == 0 and timing.host_slowdown == 1.0
    assert out["large"].median_ms > out["small"].median_ms  # a 256x256 matmul against an 8x8 one


def test_time_onnx_times_one_model_from_bytes_or_path(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(matmul_model())
    for source in (path.read_bytes(), path):
        timing = ort_timing.time_onnx(source, threads=1, batch=2, gate=None, **FAST)
        assert len(timing.rounds) == 5 and timing.runs_per_round == 2 and timing.median_ms > 0


@pytest.mark.parametrize("bad", [{"rounds": 0}, {"runs": 0}, {"warmup": -1}, {"batch": 0}])
def test_protocol_settings_out_of_range_are_refused(bad: dict) -> None:
    session = ort_timing.make_session(matmul_model())
    with pytest.raises(ValueError, match="timing needs"):
        ort_timing.time_sessions({"m": session}, **{**FAST, **bad})
    if "batch" not in bad:
        with pytest.raises(ValueError, match="timing needs"):
            ort_timing.time_runners({"m": lambda: None}, **{**FAST, **bad})


def test_rounds_visit_every_runner_once_in_a_shuffled_order_fixed_by_the_seed() -> None:
    def order(seed: int) -> list[list[str]]:
        calls: list[str] = []
        runners = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
        ort_timing.time_runners(runners, rounds=12, runs=1, warmup=0, seed=seed, gate=None)
        return [calls[i:i + 4] for i in range(0, len(calls), 4)]

    rounds = order(seed=3)
    assert len(rounds) == 12 and all(sorted(r) == list("abcd") for r in rounds)  # each runner once per round
    assert len({tuple(r) for r in rounds}) > 1  # shuffled: a slow phase of the host does not hit one runner only
    assert order(seed=3) == rounds and order(seed=4) != rounds


def test_a_round_takes_the_fastest_of_its_runs() -> None:
    # The first run of each round sleeps, the others do not: the minimum per round ignores the slow one.
    state = {"n": 0}

    def sometimes_slow() -> None:
        state["n"] += 1
        if state["n"] % 3 == 1:
            time.sleep(0.02)

    timing = ort_timing.time_runners({"m": sometimes_slow}, rounds=4, runs=3, warmup=0, gate=None)["m"]
    assert timing.median_ms < 10.0 and max(timing.rounds) < 20.0
    slow = ort_timing.time_runners({"m": lambda: time.sleep(0.002)}, rounds=3, runs=2, warmup=0, gate=None)["m"]
    assert min(slow.rounds) >= 2.0  # milliseconds


def test_the_reference_model_is_a_fixed_onnx_model_that_runs() -> None:
    blob = hostphase.reference_model()
    assert blob == hostphase.reference_model() and onnx.load_from_string(blob).graph.node  # the same bytes
    gate = hostphase.PhaseGate(ort_timing.reference_runner, calibrate_s=0.05)
    assert gate.reference(3) > 0
    base = gate.calibrate(3)
    assert base > 0 and gate.is_fast(base) and not gate.is_fast(base * (1.0 + gate.tolerance) * 1.01)


class ScriptedHost:
    """A host whose phases a test decides, on a simulated clock (``time.perf_counter`` is replaced): the reference
    takes 1 ms a run in a fast phase, 2 ms in a slow one, the model 3 ms and 6 ms. ``play(phases, runs)`` starts
    the script: one phase (True: fast) per reference round of ``runs`` runs; fast before and after it
    (calibration sees the fast phase)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fast = True
        self.script: list[bool] = []
        self.runs = 1
        self.calls = 0
        self.now = 0.0
        monkeypatch.setattr(time, "perf_counter", lambda: self.now)

    def play(self, phases: list[bool], runs: int) -> None:
        self.script, self.runs, self.calls = phases, runs, 0

    def reference(self) -> None:
        i = self.calls // self.runs
        self.fast = self.script[i] if i < len(self.script) else True
        self.calls += 1
        self.now += 0.001 if self.fast else 0.002

    def model(self) -> None:
        self.now += 0.003 if self.fast else 0.006


def scripted(monkeypatch: pytest.MonkeyPatch, phases: list[bool], runs: int) -> tuple[ScriptedHost,
                                                                                      hostphase.PhaseGate]:
    host = ScriptedHost(monkeypatch)
    gate = hostphase.PhaseGate(lambda: host.reference, calibrate_s=0.0)
    gate.calibrate(runs)
    host.play(phases, runs)
    return host, gate


def test_rounds_taken_in_a_slow_phase_are_set_aside(monkeypatch: pytest.MonkeyPatch) -> None:
    # Calibration sees the fast phase; then the reference is slow five times, then fast: a model figure counts
    # only between two fast references, so the five taken after a slow one are set aside.
    host, gate = scripted(monkeypatch, [False] * 5, runs=3)
    timing = ort_timing.time_runners({"m": host.model}, rounds=4, runs=3, warmup=0, gate=gate, max_wait_s=30)["m"]
    assert timing.settled and timing.slow_rounds == 5 and len(timing.rounds) == 4
    assert timing.rounds == pytest.approx([3.0] * 4)  # milliseconds: none of the 6 ms slow-phase rounds
    assert timing.waited_s > 0 and timing.host_slowdown < 1.0 + gate.tolerance
    assert timing.reference_ms == pytest.approx(gate.baseline) == pytest.approx(1.0)  # a fast reference run: 1 ms


def test_a_slow_phase_longer_than_the_wait_gives_an_unsettled_figure_that_refines_later(
        monkeypatch: pytest.MonkeyPatch) -> None:
    host, gate = scripted(monkeypatch, [False] * 12, runs=3)
    measurement = ort_timing.Measurement({"m": host.model}, rounds=4, runs=3, warmup=0, gate=gate)
    assert not measurement.take(max_wait_s=0.0)  # one pass of 4 rounds, all slow: no waiting
    first = measurement.timings()["m"]
    assert not first.settled and first.slow_rounds == 4 and first.median_ms == pytest.approx(6.0)
    assert measurement.take(max_wait_s=30)  # goes on from there: 8 more slow rounds, then 4 fast ones
    settled = measurement.timings()["m"]
    assert settled.settled and settled.slow_rounds == 12 and settled.rounds == pytest.approx([3.0] * 4)


def test_the_gate_baseline_is_a_low_quantile_not_a_freak_round(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1 ms a reference round, except one freak 0.5 ms round: the baseline stays at 1 ms, so rounds of 1 ms keep
    # counting as fast (with the minimum as baseline, none would again).
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    calls = [0]

    def reference() -> None:
        calls[0] += 1
        now[0] += 0.0005 if calls[0] == 50 else 0.001

    gate = hostphase.PhaseGate(lambda: reference, calibrate_s=0.0)
    base = gate.calibrate(runs=1)
    assert base == pytest.approx(1.0) and gate.is_fast(1.04) and not gate.is_fast(1.06)
    assert gate.slowdown(1.5) == pytest.approx(1.5)
    gate.reset()
    assert gate.baseline is None

"""Which phase the host is in while a round is timed: a fixed reference model timed in every round.

A shared or virtual machine alternates between fast and slow phases lasting seconds; in a slow phase every model
runs markedly slower, by a different factor per model (docs/latency.md, "Host phases"). A measurement of a few
milliseconds falls wholly inside one phase, so two measurements of one student can differ by that factor, and no
statistic over its rounds sees it. Dividing by a reference's slowdown is biased, because models slow down by
different factors. So the reference is used to *select*: a model's figure counts only when the reference, timed
just before and just after it, ran as fast as in the fast phase seen by this process (:class:`PhaseGate`; the
bracketing is `autokd.latency.protocol.Measurement`'s); figures taken in a slow phase are set aside and the
measurement goes on, or waits, until enough fast ones are in.

The reference is a small convolutional network built here (onnx helper, fixed weights): the same kind of work as
a student, so it sees the phases a student sees. Imports only numpy and onnx (never torch or onnxruntime:
`autokd.latency.protocol` runs the reference).
"""
from __future__ import annotations

import collections
import functools
import math
import time
from typing import Callable

import numpy as np

#: A reference figure counts as fast when it is at most this much above the baseline. The phases seen on shared
#: VMs differ by far more than this; within the fast phase the reference varies by far less.
DEFAULT_TOLERANCE = 0.05
#: Seconds the gate samples the reference on first use, so that a process starting in a slow phase may still find
#: a fast one before its first measurement.
DEFAULT_CALIBRATE_S = 0.5
#: Quantile of the reference's rounds taken as its fast-phase figure: low enough that a host spending a little of
#: its time in a fast phase still sets it, high enough that rare freak-fast rounds do not.
BASELINE_QUANTILE = 0.01
_MEMORY = 50_000  # reference rounds remembered for the baseline
_UPDATE_EVERY = 200  # rounds between two updates of the baseline (a sort of the memory)
_MIN_CALIBRATION_ROUNDS = 200


@functools.cache
def reference_model() -> bytes:
    """ONNX bytes of the reference: 8x16x16 input, two 3x3 convolutions of 16 channels, ReLU, global pooling, a
    10-way classifier; fixed weights. Built once per process, identical bytes every time."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    inits = [weight("w1", 16, 8, 3, 3), weight("b1", 16), weight("w2", 16, 16, 3, 3), weight("b2", 16),
             weight("wf", 10, 16), weight("bf", 10)]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "autokd_reference", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                        [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="autokd")
    model.ir_version = 8  # readable by every onnxruntime the project supports
    return model.SerializeToString()


class PhaseGate:
    """Tells a round taken in a fast phase of the host from one taken in a slow phase.

    ``reference(runs)`` times one round of the reference model (the minimum of ``runs`` runs, milliseconds);
    ``is_fast(figure)`` says whether a round whose reference took ``figure`` was in a fast phase: at most
    ``tolerance`` above the baseline. The baseline is a low quantile (:data:`BASELINE_QUANTILE`) of every
    reference round this process has timed (sampled over ``calibrate_s`` seconds on first use): the fast phase's
    figure as long as the host spends a little of its time there, and never a single lucky round.
    ``make_runner()`` returns a function running the reference once (`autokd.latency.protocol.reference_runner`:
    :func:`reference_model` in ONNX Runtime).
    """

    def __init__(self, make_runner: Callable[[], Callable[[], object]], tolerance: float = DEFAULT_TOLERANCE,
                 calibrate_s: float = DEFAULT_CALIBRATE_S) -> None:
        self.tolerance, self.calibrate_s = tolerance, calibrate_s
        self._make_runner = make_runner
        self._runner: Callable[[], object] | None = None
        self._seen: collections.deque[float] = collections.deque(maxlen=_MEMORY)
        self._baseline: float | None = None
        self._since_update = 0

    def _run(self) -> Callable[[], object]:
        if self._runner is None:  # built on first use: a process that never measures never loads it
            self._runner = self._make_runner()
            for _ in range(5):  # warm-up: the first runs of a session allocate
                self._runner()
        return self._runner

    def reset(self) -> None:
        """Forget every reference round: the next measurement calibrates anew, as in a new process."""
        self._seen.clear()
        self._baseline, self._since_update = None, 0

    def reference(self, runs: int) -> float:
        """One round of the reference: the minimum of ``runs`` runs, in milliseconds (remembered for the
        baseline)."""
        run, best, clock = self._run(), math.inf, time.perf_counter
        for _ in range(runs):
            t0 = clock()
            run()
            best = min(best, clock() - t0)
        figure = best * 1000.0
        self._seen.append(figure)
        self._since_update += 1
        return figure

    @property
    def baseline(self) -> float | None:
        """The reference's figure in a fast phase (None before the first calibration)."""
        if self._seen and (self._baseline is None or self._since_update >= _UPDATE_EVERY):
            ordered = sorted(self._seen)
            self._baseline = ordered[int(BASELINE_QUANTILE * (len(ordered) - 1))]
            self._since_update = 0
        return self._baseline

    def calibrate(self, runs: int) -> float:
        """The baseline, after sampling the reference over ``calibrate_s`` seconds on first use."""
        if self._baseline is None:
            until = time.perf_counter() + self.calibrate_s
            while time.perf_counter() < until or len(self._seen) < _MIN_CALIBRATION_ROUNDS:
                self.reference(runs)
        baseline = self.baseline
        assert baseline is not None
        return baseline

    def slowdown(self, figure: float) -> float:
        """``figure`` relative to the baseline."""
        return figure / self.calibrate(1)

    def is_fast(self, figure: float) -> bool:
        """Whether a round whose reference took ``figure`` milliseconds was in a fast phase."""
        return self.slowdown(figure) <= 1.0 + self.tolerance


__all__ = ["BASELINE_QUANTILE", "DEFAULT_CALIBRATE_S", "DEFAULT_TOLERANCE", "PhaseGate", "reference_model"]

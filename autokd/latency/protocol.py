"""The ONNX Runtime timing protocol: sessions, rounds, the statistic, its interval, the device signature.

Imports only the standard library, numpy and onnxruntime (never torch or timm), so a latency server on a
target device times uploaded ONNX files with exactly the protocol a search uses (:func:`time_sessions`; the
measurements behind it: docs/latency.md, "Protocol").
"""
from __future__ import annotations

import functools
import math
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import onnxruntime as ort

from autokd.latency.hostphase import PhaseGate, reference_model

RUNTIME = "onnxruntime"
DEFAULT_ROUNDS = 15
DEFAULT_RUNS = 5
DEFAULT_WARMUP = 5
DEFAULT_PROVIDER = "CPUExecutionProvider"
CONFIDENCE = 0.95
# Relative half-width below which an interval is not trusted: the interval of one measurement sees the spread
# of its own rounds, not what differs between processes (memory layout, the host's state); two processes timing
# the same students differ by about this much at the median (docs/latency.md, "Intervals").
REPRODUCIBILITY = 0.02

OnnxSource = Union[bytes, str, os.PathLike]


@dataclass
class Timing:
    """One model's measurement: the median of per-round minima and its interval, in milliseconds."""

    median_ms: float
    low_ms: float
    high_ms: float
    rounds: list[float] = field(default_factory=list)  # per-round minima, in the order taken
    runs_per_round: int = DEFAULT_RUNS
    seconds: float = 0.0  # wall time of warm-up and timed runs
    host_slowdown: float = 1.0  # the reference model's median over the kept rounds relative to its baseline
    settled: bool = True  # every kept round was taken in a fast phase of the host (hostphase.PhaseGate)
    slow_rounds: int = 0  # rounds set aside because the reference showed a slow phase
    waited_s: float = 0.0  # seconds spent waiting for a slow phase to pass
    reference_ms: float = 0.0  # the reference's fast-phase figure the rounds were judged against (0: no gate)

    @property
    def spread_ms(self) -> float:
        """Inter-quartile range of the per-round figures (0 with fewer than 2 rounds)."""
        if len(self.rounds) < 2:
            return 0.0
        q = statistics.quantiles(self.rounds, n=4, method="inclusive")
        return q[2] - q[0]


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, read once), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers."""
    return list(ort.get_available_providers())


def signature(threads: int, provider: str = DEFAULT_PROVIDER, device: str | None = None) -> dict[str, Any]:
    """What an ONNX Runtime latency depends on: device, runtime, its version, execution provider, threads."""
    return {"device": device or f"cpu:{cpu_model()}", "runtime": RUNTIME, "version": ort.__version__,
            "provider": provider, "threads": int(threads)}


def make_session(onnx: OnnxSource, threads: int | None = 1, provider: str = DEFAULT_PROVIDER) -> ort.InferenceSession:
    """An inference session on ``onnx`` (bytes or a path) on ``provider``, run sequentially with ``threads``
    intra-op threads (None: ONNX Runtime's default)."""
    return _new_session(onnx, threads, provider)


def _new_session(onnx: OnnxSource, threads: int | None, provider: str) -> ort.InferenceSession:
    if provider not in available_providers():
        raise ValueError(f"ONNX Runtime execution provider {provider!r} is not available here; available: "
                         f"{', '.join(available_providers())}")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    source = onnx if isinstance(onnx, bytes) else str(onnx)
    return ort.InferenceSession(source, opts, providers=[provider])


#: numpy dtype of each ONNX Runtime input type the protocol can feed.
INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                "tensor(int8)": np.int8, "tensor(int16)": np.int16, "tensor(int32)": np.int32,
                "tensor(int64)": np.int64, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
                "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_}
#: Elements generated at a time when an input's dtype has no direct generator (a bounded temporary).
_FILL_CHUNK = 1 << 20


def input_specs(session: ort.InferenceSession, batch: int = 1) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, shape, dtype) of every input of the session: the first axis takes ``batch``, other dynamic axes 1.
    Nothing is allocated, so a caller can refuse an input too large before building it."""
    specs = []
    for arg in session.get_inputs():
        if arg.type not in INPUT_DTYPES:
            raise ValueError(f"input {arg.name[:64]!r} has type {arg.type}, which the latency protocol cannot "
                             f"feed (it feeds {', '.join(INPUT_DTYPES)})")
        shape = tuple(batch if i == 0 else d if isinstance(d, int) and d >= 0 else 1 for i, d in enumerate(arg.shape))
        specs.append((arg.name, shape, np.dtype(INPUT_DTYPES[arg.type])))
    return specs


def make_inputs(specs: list[tuple[str, tuple[int, ...], np.dtype]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the given (name, shape, dtype), each built once in its own dtype: standard normal
    floats, 0/1 integers and booleans. A float64 array cast to float32 would need three times the input's size."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        array = np.empty(shape, dtype)
        if dtype in (np.float32, np.float64):
            rng.standard_normal(dtype=dtype, out=array)
        else:
            flat = array.reshape(-1)  # a view: np.empty is contiguous
            for start in range(0, flat.size, _FILL_CHUNK):
                n = min(_FILL_CHUNK, flat.size - start)
                if dtype.kind == "f":
                    flat[start:start + n] = rng.standard_normal(n, dtype=np.float32)
                else:
                    flat[start:start + n] = rng.integers(0, 2, n, dtype=np.int8)
        feed[name] = array
    return feed


def make_input(session: ort.InferenceSession, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of batch ``batch`` for every input of the session (dynamic axes: see :func:`input_specs`)."""
    return make_inputs(input_specs(session, batch), seed)


def median_interval(figures: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Distribution-free interval of the median of ``figures`` from their order statistics (binomial).

    With n figures, the median lies between the k-th smallest and the k-th largest with probability
    1 - 2 P(Binomial(n, 1/2) < k); k is the largest that keeps this >= ``confidence``. With too few figures for
    the confidence asked, the interval is their whole range.
    """
    xs = sorted(figures)
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    k = 0  # [xs[k], xs[n-1-k]] covers the median with probability 1 - 2 P(Binomial(n, 1/2) <= k)
    while k + 1 <= (n - 1) // 2:
        below = sum(math.comb(n, i) for i in range(k + 2)) / 2.0 ** n
        if 1.0 - 2.0 * below < confidence:
            break
        k += 1
    return xs[k], xs[n - 1 - k]


def widen(median: float, low: float, high: float, rel: float = REPRODUCIBILITY) -> tuple[float, float]:
    """``(low, high)`` widened to at least ``median`` +- ``rel`` (see :data:`REPRODUCIBILITY`)."""
    return min(low, median * (1.0 - rel)), max(high, median * (1.0 + rel))


def _run_round(run: Callable[[], object], runs: int) -> float:
    best = math.inf
    clock = time.perf_counter
    for _ in range(runs):
        t0 = clock()
        run()
        best = min(best, clock() - t0)
    return best * 1000.0


def reference_runner(threads: int = 1) -> Callable[[], object]:
    """A function running the host-phase reference model (`hostphase.reference_model`) once in ONNX Runtime."""
    session = _new_session(reference_model(), threads, DEFAULT_PROVIDER)
    return functools.partial(session.run, None, make_input(session))


GATE = PhaseGate(reference_runner)  # one per process: the baseline holds across the measurements of a search
#: Seconds a measurement may spend in slow phases of the host (waiting, and rounds set aside) before it gives up
#: waiting and returns an unsettled figure from all its rounds.
DEFAULT_MAX_WAIT_S = 10.0


def time_sessions(sessions: dict[str, ort.InferenceSession], batch: int = 1, rounds: int = DEFAULT_ROUNDS,
                  runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP, seed: int = 0,
                  gate: PhaseGate | None = GATE, max_wait_s: float = DEFAULT_MAX_WAIT_S) -> dict[str, Timing]:
    """Time several sessions together: ``rounds`` rounds, each visiting every session once in a shuffled order
    for ``runs`` runs (its figure: the minimum); result per session: median over rounds and its interval.

    Why: a round's minimum ignores a short hiccup of a shared host that catches part of the round, and
    interleaving the sessions in shuffled order makes a slow phase hit them alike. The interval is
    :func:`median_interval` of the per-round figures, widened by :func:`widen`.

    With ``gate`` (default: the process's :data:`GATE`), a reference model runs in every round too, and only
    rounds taken in a fast phase of the host count (:mod:`autokd.latency.hostphase`): rounds in a slow phase are
    set aside and the protocol waits for the phase to pass, at most ``max_wait_s`` seconds; after that it returns
    the median of all its rounds, marked not ``settled``.
    """
    if rounds < 1 or runs < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"timing needs rounds, runs, batch >= 1 and warmup >= 0; got rounds={rounds}, "
                         f"runs={runs}, batch={batch}, warmup={warmup}")
    runners = {name: functools.partial(s.run, None, make_input(s, batch)) for name, s in sessions.items()}
    return time_runners(runners, rounds=rounds, runs=runs, warmup=warmup, seed=seed, gate=gate, max_wait_s=max_wait_s)


def time_runners(runners: dict[str, Callable[[], object]], rounds: int = DEFAULT_ROUNDS, runs: int = DEFAULT_RUNS,
                 warmup: int = DEFAULT_WARMUP, seed: int = 0, gate: PhaseGate | None = GATE,
                 max_wait_s: float = DEFAULT_MAX_WAIT_S) -> dict[str, Timing]:
    """The protocol of :func:`time_sessions` for any runtime: each runner runs its model once on its input and
    returns when the result is ready (a GPU runner synchronises the device)."""
    measurement = Measurement(runners, rounds=rounds, runs=runs, warmup=warmup, seed=seed, gate=gate)
    measurement.take(max_wait_s)
    return measurement.timings()


class Measurement:
    """The protocol of :func:`time_sessions`, resumable: :meth:`take` adds rounds until every runner has
    ``rounds`` figures taken in a fast phase of the host, or its wait runs out; a later :meth:`take` (a trial
    between two epochs) goes on from there. :meth:`timings` is the figure so far, ``settled`` once enough fast
    rounds are in.

    With a gate, the reference runs between groups of :data:`_MODELS_PER_REFERENCE` models, the sequence
    continuing from round to round (reference, group, reference, group, ...): each model's figure is
    bracketed by the reference run just before its group and the one just after, and counts when both were fast
    (the phase may change at any moment; a figure between two fast references was taken in a fast phase).
    """

    def __init__(self, runners: dict[str, Callable[[], object]], rounds: int = DEFAULT_ROUNDS,
                 runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP, seed: int = 0,
                 gate: PhaseGate | None = GATE) -> None:
        if rounds < 1 or runs < 1 or warmup < 0:
            raise ValueError(f"timing needs rounds, runs >= 1 and warmup >= 0; got rounds={rounds}, runs={runs}, "
                             f"warmup={warmup}")
        self.runners, self.rounds, self.runs, self.warmup, self.gate = runners, rounds, runs, warmup, gate
        self._rng = random.Random(seed)
        # per runner, in the order taken: (the slower of the two references around it, its figure, which take)
        self._taken: dict[str, list[tuple[float, float, int]]] = {name: [] for name in runners}
        self.takes = 0  # calls of take(): a figure from several takes was measured at several moments
        self._last_reference: float | None = None
        self.rounds_taken = 0
        self.waited_s = 0.0  # seconds of rounds that gave some runner a figure it could not keep
        self.seconds = 0.0  # seconds spent in take()
        self._warm = False

    def _fast(self) -> Callable[[float], bool]:
        """Whether a figure's bracketing reference was fast, judged against the latest baseline (a faster phase
        found later disqualifies earlier figures): `PhaseGate.is_fast` with the baseline read once, as this is
        asked of every figure after every round."""
        gate = self.gate
        if gate is None:
            return lambda ref: True
        baseline, bound = gate.calibrate(1), 1.0 + gate.tolerance
        return lambda ref: ref / baseline <= bound

    def _kept(self, name: str, fast: Callable[[float], bool] | None = None) -> list[float]:
        """``name``'s figures taken in a fast phase."""
        fast = fast or self._fast()
        return [figure for ref, figure, _ in self._taken[name] if fast(ref)]

    def moments(self) -> int:
        """Takes that gave every runner at least one fast figure: the moments the figure was measured at."""
        fast = self._fast()
        counts = [len({take for ref, _, take in self._taken[name] if fast(ref)}) for name in self.runners]
        return min(counts, default=0)

    def _missing(self) -> int:
        fast = self._fast()
        return sum(max(0, self.rounds - len(self._kept(name, fast))) for name in self.runners)

    @property
    def settled(self) -> bool:
        """Whether every runner has ``rounds`` figures taken in a fast phase."""
        return self._missing() == 0

    def take(self, max_wait_s: float, probe: int = 0) -> bool:
        """Take rounds until settled, or until ``max_wait_s`` more seconds went to rounds in slow phases (0: one
        pass of ``rounds`` rounds at most when the host is slow). ``probe`` (a number of rounds): take up to that
        many rounds while the host is fast, also when settled, and stop at the first round taken in a slow phase
        (a probe costs one round while the host is slow). Returns ``settled``."""
        started = time.perf_counter()
        gate = self.gate
        if gate is not None:
            gate.calibrate(self.runs)
        if not self._warm:
            for run in self.runners.values():
                for _ in range(self.warmup):
                    run()
            self._warm = True
        waited, taken_now = 0.0, 0
        self.takes += 1
        missing = self._missing()
        while (taken_now < probe) if probe else missing > 0:
            t0 = time.perf_counter()
            gained = self._round()
            taken_now += 1
            missing = self._missing() if gained else missing
            if gained == len(self.runners):
                continue
            waited += time.perf_counter() - t0  # a slow phase (or part of one): go on, within the wait
            if probe or (waited >= max_wait_s and taken_now >= self.rounds):
                break
        self.waited_s += waited
        self.seconds += time.perf_counter() - started
        return missing == 0

    def _round(self) -> int:
        """One round: every runner once, shuffled, a reference between groups. Returns how many figures count."""
        names = list(self.runners)
        self._rng.shuffle(names)
        self.rounds_taken += 1
        if self.gate is None:
            for name in names:
                self._taken[name].append((0.0, _run_round(self.runners[name], self.runs), self.takes))
            return len(names)
        gate, kept = self.gate, 0
        before = self._last_reference if self._last_reference is not None else gate.reference(self.runs)
        for start in range(0, len(names), _MODELS_PER_REFERENCE):
            group = names[start:start + _MODELS_PER_REFERENCE]
            figures = {name: _run_round(self.runners[name], self.runs) for name in group}
            after = gate.reference(self.runs)
            bracket = max(before, after)
            fast = gate.is_fast(bracket)
            for name, figure in figures.items():
                self._taken[name].append((bracket, figure, self.takes))
                kept += fast
            before = after
        self._last_reference = before
        return kept

    def timings(self) -> dict[str, Timing]:
        """Per runner: the median of its fast figures when it has ``rounds`` of them; else of the ``rounds``
        figures with the fastest references around them (the closest to a fast phase the host came)."""
        gate, out, fast = self.gate, {}, self._fast()
        for name in self.runners:
            taken = self._taken[name]
            kept = [(ref, figure) for ref, figure, _ in taken if fast(ref)]
            settled = len(kept) >= self.rounds
            use = kept if settled else sorted((ref, figure) for ref, figure, _ in taken)[:self.rounds]
            xs = [figure for _, figure in use]
            slowdown = (statistics.median(ref for ref, _ in use) / gate.baseline
                        if gate is not None and gate.baseline else 1.0)
            low, high = widen(statistics.median(xs), *median_interval(xs))
            out[name] = Timing(median_ms=statistics.median(xs), low_ms=low, high_ms=high, rounds=xs,
                               runs_per_round=self.runs, seconds=self.seconds, host_slowdown=slowdown,
                               settled=settled, slow_rounds=len(taken) - len(kept), waited_s=self.waited_s,
                               reference_ms=gate.baseline if gate is not None and gate.baseline else 0.0)
        return out


#: Models timed between two runs of the reference: a round of many models takes long enough for the host's
#: phase to change within it, and each model's figure must sit between two reference figures close in time.
_MODELS_PER_REFERENCE = 3


def time_onnx(onnx: OnnxSource, threads: int = 1, batch: int = 1, provider: str = DEFAULT_PROVIDER,
              **protocol: Any) -> Timing:
    """Time one ONNX model (bytes or path) with the protocol of :func:`time_sessions`."""
    return time_sessions({"model": make_session(onnx, threads, provider)}, batch=batch, **protocol)["model"]


__all__ = ["CONFIDENCE", "DEFAULT_MAX_WAIT_S", "DEFAULT_PROVIDER", "DEFAULT_ROUNDS", "DEFAULT_RUNS", "DEFAULT_WARMUP",
           "GATE", "INPUT_DTYPES", "REPRODUCIBILITY", "RUNTIME", "Measurement", "Timing", "available_providers",
           "cpu_model", "input_specs", "make_input", "make_inputs", "make_session", "median_interval",
           "reference_runner", "signature", "time_onnx", "time_runners", "time_sessions", "widen"]

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
    host_slowdown: float = 1.0  # the reference workload's figure relative to the process's fastest (HostCheck)
    attempts: int = 1  # measurements taken (more than 1: the host was in a slow phase)

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


class HostCheck:
    """Detects a slow phase of the host: a fixed reference workload (numpy, single-threaded) is timed in every
    round beside the models; when its figure is more than ``tolerance`` above the process's baseline, the whole
    measurement is taken again after a pause (at most ``retries`` times; the attempt with the fastest reference
    is kept). A short measurement can fall entirely inside one slow phase, where the minimum per round does
    not help; on a quiet host this costs one reference run per model run.

    The baseline is the lowest reference figure seen in the process, first calibrated over ``calibrate_s``
    seconds (so a process that starts in a slow phase still finds a fast one).
    """

    def __init__(self, tolerance: float = 0.05, retries: int = 4, pause_s: float = 0.1,
                 calibrate_s: float = 0.5) -> None:
        self.tolerance, self.retries, self.pause_s, self.calibrate_s = tolerance, retries, pause_s, calibrate_s
        self.baseline: float | None = None
        self._x = np.random.default_rng(0).random(16384).astype(np.float32)

    def reference(self, runs: int) -> float:
        """One round of the reference workload: the minimum of ``runs`` runs, in milliseconds."""
        best = math.inf
        x, clock = self._x, time.perf_counter
        for _ in range(runs):
            t0 = clock()
            float(np.sqrt(x * x + 1.0).sum())
            best = min(best, clock() - t0)
        return best * 1000.0

    def calibrate(self, runs: int = DEFAULT_RUNS) -> float:
        """The baseline (calibrated on first use)."""
        if self.baseline is None:
            figures = []
            until = time.perf_counter() + self.calibrate_s
            while time.perf_counter() < until or len(figures) < 5:
                figures.append(self.reference(runs))
                time.sleep(self.calibrate_s / 20)
            self.baseline = min(figures)
        return self.baseline

    def slowdown(self, reference_ms: float) -> float:
        """``reference_ms`` relative to the baseline (1.0 = as fast as the fastest seen); lowers the baseline."""
        base = self.calibrate()
        self.baseline = min(base, reference_ms)
        return reference_ms / base


HOST = HostCheck()  # one per process: the baseline holds across the measurements of a search


def time_sessions(sessions: dict[str, ort.InferenceSession], batch: int = 1, rounds: int = DEFAULT_ROUNDS,
                  runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP, seed: int = 0,
                  host: HostCheck | None = HOST) -> dict[str, Timing]:
    """Time several sessions together: ``rounds`` rounds, each visiting every session once in a shuffled order
    for ``runs`` runs (its figure: the minimum); result per session: median over rounds and its interval.

    Why: a round's minimum ignores a slow phase of a shared host that catches part of the round, and the
    median over rounds ignores slow phases that catch whole rounds, as long as fewer than half are caught;
    interleaving the sessions in shuffled order makes a slow phase hit them alike. The interval is
    :func:`median_interval` of the per-round figures, widened by :func:`widen`.

    With ``host`` (default: the process's :data:`HOST`), the reference workload runs in every round too, and a
    measurement taken in a slow phase of the host is taken again (see :class:`HostCheck`).
    """
    if rounds < 1 or runs < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"timing needs rounds, runs, batch >= 1 and warmup >= 0; got rounds={rounds}, "
                         f"runs={runs}, batch={batch}, warmup={warmup}")
    runners = {name: functools.partial(s.run, None, make_input(s, batch)) for name, s in sessions.items()}
    return time_runners(runners, rounds=rounds, runs=runs, warmup=warmup, seed=seed, host=host)


def time_runners(runners: dict[str, Callable[[], object]], rounds: int = DEFAULT_ROUNDS, runs: int = DEFAULT_RUNS,
                 warmup: int = DEFAULT_WARMUP, seed: int = 0, host: HostCheck | None = HOST) -> dict[str, Timing]:
    """The protocol of :func:`time_sessions` for any runtime: each runner runs its model once on its input and
    returns when the result is ready (a GPU runner synchronises the device)."""
    if rounds < 1 or runs < 1 or warmup < 0:
        raise ValueError(f"timing needs rounds, runs >= 1 and warmup >= 0; got rounds={rounds}, runs={runs}, "
                         f"warmup={warmup}")
    started = time.perf_counter()
    if host is not None:
        host.calibrate(runs)
    for run in runners.values():
        for _ in range(warmup):
            run()
    rng = random.Random(seed)
    best: tuple[float, dict[str, list[float]]] | None = None
    attempts = 0
    for attempt in range((host.retries if host is not None else 0) + 1):
        attempts = attempt + 1
        if attempt and host is not None:
            time.sleep(host.pause_s * attempt)
        figures, reference = _rounds(runners, rounds, runs, rng, host)
        slow = host.slowdown(statistics.median(reference)) if host is not None else 1.0
        if best is None or slow < best[0]:
            best = (slow, figures)
        if host is None or slow <= 1.0 + host.tolerance:
            break
    assert best is not None
    seconds = time.perf_counter() - started
    out: dict[str, Timing] = {}
    for name, xs in best[1].items():
        low, high = widen(statistics.median(xs), *median_interval(xs))
        out[name] = Timing(median_ms=statistics.median(xs), low_ms=low, high_ms=high, rounds=xs,
                           runs_per_round=runs, seconds=seconds, host_slowdown=best[0], attempts=attempts)
    return out


def _rounds(runners: dict[str, Callable[[], object]], rounds: int, runs: int, rng: random.Random,
            host: HostCheck | None) -> tuple[dict[str, list[float]], list[float]]:
    ref = object()  # the reference workload's place in the shuffled order
    order: list[Any] = [*runners, *([ref] if host is not None else [])]
    figures: dict[str, list[float]] = {name: [] for name in runners}
    reference: list[float] = []
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            if name is ref:
                reference.append(host.reference(runs))  # type: ignore[union-attr]
            else:
                figures[name].append(_run_round(runners[name], runs))
    return figures, reference or [1.0]


def time_onnx(onnx: OnnxSource, threads: int = 1, batch: int = 1, provider: str = DEFAULT_PROVIDER,
              **protocol: Any) -> Timing:
    """Time one ONNX model (bytes or path) with the protocol of :func:`time_sessions`."""
    return time_sessions({"model": make_session(onnx, threads, provider)}, batch=batch, **protocol)["model"]


__all__ = ["CONFIDENCE", "DEFAULT_PROVIDER", "DEFAULT_ROUNDS", "DEFAULT_RUNS", "DEFAULT_WARMUP", "HOST", "HostCheck",
           "INPUT_DTYPES", "REPRODUCIBILITY", "RUNTIME", "Timing", "available_providers", "cpu_model", "input_specs",
           "make_input", "make_inputs", "make_session", "median_interval", "signature", "time_onnx", "time_runners",
           "time_sessions", "widen"]

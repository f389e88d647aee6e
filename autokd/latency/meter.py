"""Measured latency (plus params and MACs) of a student on a device, and a multi-process-safe cache.

:class:`LatencyMeter` is what a search uses: the runtime (ONNX Runtime on the exported student, the CPU
default, or eager PyTorch), the rounds protocol of :mod:`autokd.latency.protocol`, the cache, the study-wide shared
figure and the measuring lock.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autokd.errors import UserError
from autokd.latency import protocol
from autokd.latency.anchors import anchor_spec, shape_of
from autokd.model.students import StudentSpec, available_families, build_from_spec
from autokd.utils.atomic import atomic_write_text
from autokd.utils.devices import torch_device

if TYPE_CHECKING:
    from autokd.latency.remote.client import RemoteTarget

logger = logging.getLogger(__name__)


@dataclass
class LatencyResult:
    """One latency measurement. ``params`` and ``macs`` are per model / per single image."""

    median_ms: float
    iqr_ms: float
    runs: int
    batch_size: int
    threads: int
    device: str
    host: str
    params: int
    macs: int
    key: str
    runtime: str = "torch"
    low_ms: float | None = None   # interval of the median (see protocol.median_interval); None: not known
    high_ms: float | None = None
    rounds: int = 0               # rounds of the protocol
    export_s: float = 0.0         # seconds spent exporting the student to ONNX for this measurement
    timing_s: float = 0.0         # seconds spent timing (sessions, warm-up, rounds)
    host_slowdown: float = 1.0    # reference model vs its fast-phase figure over the kept rounds (hostphase)
    settled: bool = True          # all its rounds taken in a fast phase of the host; False: provisional
    slow_rounds: int = 0          # rounds set aside because the host was in a slow phase
    waited_s: float = 0.0         # seconds of rounds set aside
    moments: int = 1              # separate takes its fast rounds came from (a trial refines it while it trains)
    precision: str = "fp32"       # what was timed: the fp32 ONNX model or its INT8 quantisation
    quantize_s: float = 0.0       # seconds spent quantising the exported student (--latency-precision int8)
    reference_ms: float = 0.0     # the host-phase reference's fast-phase figure it was judged against (0: none):
                                  # how fast this host was at the time, to compare figures of two processes
    anchor: str = ""              # key of the family anchor timed beside it (autokd.latency.anchors; "": none)
    own_ms: float = 0.0           # with an anchor: the student's own median in those rounds (median_ms is
    anchor_ms: float = 0.0        # own_ms / anchor_ms * anchor_panel_ms), the anchor's median in the same rounds
    anchor_panel_ms: float = 0.0  # and the anchor's figure from the panel measurement

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict."""
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> LatencyResult:
        """Inverse of ``to_dict``; unknown keys are ignored, missing optional ones take their defaults."""
        return LatencyResult(**{f.name: d[f.name] for f in fields(LatencyResult) if f.name in d})

    @property
    def interval(self) -> tuple[float, float]:
        """(low, high) milliseconds; the median itself when no interval was measured."""
        low = self.low_ms if self.low_ms is not None else self.median_ms
        high = self.high_ms if self.high_ms is not None else self.median_ms
        return float(low), float(high)


def _device_name(dev: torch.device) -> str:
    """Human-readable device, e.g. ``cpu:Intel(R) Xeon(R) ...`` or ``cuda:NVIDIA H100 80GB HBM3``."""
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    if dev.type == "cpu":
        return f"cpu:{protocol.cpu_model()}"
    return dev.type


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:100] or "unknown"


def device_signature(device: str | torch.device, threads: int) -> str:
    """Filesystem-safe name of what latency depends on: ``cpu-<cpu model>-t<threads>`` or ``cuda-<gpu name>``."""
    dev = torch_device(device)
    if dev.type == "cuda":  # the thread count barely matters once the work is on the GPU
        return _slug(_device_name(dev))
    return f"{_slug(_device_name(dev))}-t{int(threads)}"


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates for one image (FLOPs by torch's ``FlopCounterMode`` / 2); 0 if they cannot be
    counted."""
    was_training = model.training
    try:
        model.eval()
        x = torch.zeros(1, *input_shape, device=_model_device(model))
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            model(x)
        return int(counter.get_total_flops()) // 2
    except Exception:  # noqa: BLE001 - MACs are informational; an op the counter chokes on must not fail a trial
        return 0
    finally:
        model.train(was_training)


class LatencyCache:
    """Latency results on disk: ``root/<device signature>/<key>.json``, written atomically.

    Several processes may share one cache: each write is atomic (:mod:`autokd.utils.atomic`), so a reader sees either
    no file or a complete one.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, key: str, device_sig: str) -> Path:
        """Where the result for ``key`` on ``device_sig`` lives."""
        for name, value in (("key", key), ("device signature", device_sig)):
            if not value or not re.fullmatch(r"[A-Za-z0-9._-]+", value) or value.startswith("."):
                raise ValueError(f"latency cache {name} {value!r} is not a safe file name")
        return self.root / device_sig / f"{key}.json"

    def get(self, key: str, device_sig: str) -> LatencyResult | None:
        """The cached result, or None (also for an unreadable or malformed file, which is re-measured)."""
        try:
            return LatencyResult.from_dict(json.loads(self.path(key, device_sig).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, result: LatencyResult, device_sig: str) -> None:
        """Store ``result`` under its ``key``."""
        atomic_write_text(self.path(result.key, device_sig), json.dumps(result.to_dict(), indent=1, sort_keys=True))


def _cache_key(spec: StudentSpec, batch_size: int) -> str:
    # The architecture key alone for the default batch 1; other batch sizes are other measurements.
    return spec.key if batch_size == 1 else f"{spec.key}-b{batch_size}"


RUNTIMES = ("onnxruntime", "torch")


def default_runtime(device: str | torch.device) -> str:
    """``onnxruntime`` on a CPU (what ``autokd export`` ships), ``torch`` on CUDA (as trained)."""
    return "torch" if torch_device(device).type == "cuda" else "onnxruntime"


def _torch_timings(models: dict[str, tuple[nn.Module, torch.Tensor]], dev: torch.device, rounds: int, runs: int,
                   warmup: int, seed: int = 0) -> dict[str, protocol.Timing]:
    """The rounds protocol of :mod:`autokd.latency.protocol` for eager PyTorch models (CUDA synchronised per run)."""
    def runner(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            model(x)
            if dev.type == "cuda":  # the run ends when the device is done, not when the kernels are queued
                torch.cuda.synchronize(dev)
        return run

    with torch.inference_mode():
        return protocol.time_runners({name: runner(m, x) for name, (m, x) in models.items()}, rounds=rounds,
                                       runs=runs, warmup=warmup, seed=seed, gate=None)


@dataclass
class Anchor:
    """One family's anchor (`autokd.latency.anchors`): its cache key, a function running it once, and the panel's
    result for it (what a trial that samples the anchor itself gets)."""

    key: str
    run: Callable[[], object]
    result: LatencyResult

    @property
    def panel_ms(self) -> float:
        """The anchor's panel figure, milliseconds: what students beside it are scaled to."""
        return self.result.median_ms


@dataclass
class _Pending:
    """A provisional measurement kept for `LatencyMeter.refine`."""

    measurement: protocol.Measurement
    params: int
    macs: int
    timing_s: float
    export_s: float = 0.0
    quantize_s: float = 0.0
    anchor: Anchor | None = None


#: Held while a measurement runs (`autokd.utils.locks.CpuGate.measuring`): no worker of this machine trains then.
MeasureLock = Callable[[], contextlib.AbstractContextManager[Any]]


class LatencyMeter:
    """The one owner of latency in a search: runtime, protocol, the on-disk cache and the lock that serialises
    timing against training. Built whole (a search's by `autokd.search.run.make_latency_meter`); the study-wide
    record of a shared storage wraps it (`autokd.latency.pinning.StudyLatency`).

    ``runtime`` ``onnxruntime`` exports the student with :func:`autokd.latency.onnx_export.export_onnx` (the function
    ``autokd export`` ships with) and times the ONNX model with :mod:`autokd.latency.protocol`; ``torch`` times the
    eager module. Both use the same rounds protocol (``rounds`` x ``runs``, minimum per round, median over
    rounds, order-statistic interval).
    """

    def __init__(self, runtime: str | None = None, device: str | torch.device = "cpu", threads: int = 1,
                 batch: int = 1, cache: LatencyCache | None = None, lock: MeasureLock | None = None,
                 rounds: int = protocol.DEFAULT_ROUNDS, runs: int = protocol.DEFAULT_RUNS,
                 warmup: int = protocol.DEFAULT_WARMUP, precision: str | None = None,
                 target: RemoteTarget | None = None, max_wait_s: float = protocol.DEFAULT_MAX_WAIT_S,
                 anchored: bool = True, anchor_families: Sequence[str] | None = None) -> None:
        from autokd.latency.quantize import validate_latency_precision

        self.target = target  # time on that device (an `autokd latency-server`) instead of this one
        self.dev = torch.device("cpu") if target is not None else torch_device(device)
        if target is not None and runtime not in (None, "onnxruntime"):
            raise UserError(f"--latency-target times ONNX files with ONNX Runtime on the target; --latency-runtime "
                            f"{runtime!r} cannot be used with it (drop it, or use onnxruntime)")
        runtime = runtime or ("onnxruntime" if target is not None else default_runtime(self.dev))
        if runtime not in RUNTIMES:
            raise UserError(f"--latency-runtime {runtime!r}: unknown runtime; valid: {', '.join(RUNTIMES)}")
        self.precision = validate_latency_precision(precision)
        if self.precision == "int8" and runtime != "onnxruntime":
            raise UserError(f"--latency-precision int8 times the student's INT8 ONNX model, which needs "
                            f"--latency-runtime onnxruntime (got {runtime!r}"
                            + (", the default on CUDA" if runtime == default_runtime(self.dev) else "")
                            + "); use --latency-runtime onnxruntime, or --latency-precision fp32")
        if threads < 1 or batch < 1 or rounds < 1 or runs < 1 or warmup < 0:
            raise UserError(f"latency measurement needs threads, batch, rounds, runs >= 1 and warmup >= 0; got "
                            f"threads={threads}, batch={batch}, rounds={rounds}, runs={runs}, warmup={warmup}")
        self.runtime = runtime
        self.threads, self.batch = int(threads), int(batch)
        self.rounds, self.runs, self.warmup = rounds, runs, warmup
        self.cache, self.lock = cache, lock
        # How long a new measurement may wait out slow phases of the host; an unsettled one stays pending here
        # (key -> what refine() needs) until refine() settles it.
        self.max_wait_s = max_wait_s
        self._pending: dict[str, _Pending] = {}
        # Time each student beside its family's anchor (ONNX Runtime on this machine only): input shape -> family
        # -> anchor, built on first use for ``anchor_families`` (a search's: its space's; None: all registered).
        self.anchored = anchored and runtime == "onnxruntime" and target is None
        self.anchor_families = None if anchor_families is None else tuple(anchor_families)
        self._panels: dict[tuple[int, int, int], dict[str, Anchor]] = {}
        self.provider = None
        self.target_info: dict[str, Any] | None = None
        if target is not None:  # the target answers with its own signature (exit 2 here if it cannot be reached)
            self.target_info = target.check(self.threads)
            self.provider = self.target_info["provider"]
        elif runtime == "onnxruntime":
            self.provider = "CUDAExecutionProvider" if self.dev.type == "cuda" else protocol.DEFAULT_PROVIDER
            if self.provider not in protocol.available_providers():
                raise UserError(f"--latency-runtime onnxruntime on {self.dev}: this onnxruntime build has no "
                                f"{self.provider} (it has {', '.join(protocol.available_providers())}); install "
                                "onnxruntime-gpu, or use --latency-runtime torch")

    # -- identity -------------------------------------------------------------------------------------------
    def signature_info(self) -> dict[str, Any]:
        """What the latencies depend on: device, runtime, its version, execution provider, threads, batch."""
        if self.target_info is not None:
            info = {**self.target_info, "target": self.target.url}
        elif self.runtime == "onnxruntime":
            info = protocol.signature(self.threads, self.provider or protocol.DEFAULT_PROVIDER,
                                        device=_device_name(self.dev))
        else:
            info = {"device": _device_name(self.dev), "runtime": "torch", "version": torch.__version__,
                    "provider": self.dev.type, "threads": self.threads}
        return {**info, "batch": self.batch, "precision": self.precision}

    def signature(self) -> str:
        """Filesystem-safe signature: ``<device signature>-<runtime>-<version>[-<provider>]-<precision>``."""
        info = self.signature_info()
        # A target's device is named as a local one would be: the same hardware gives the same signature.
        device = (f"{_slug(info['device'])}-t{self.threads}" if self.target_info is not None
                  else device_signature(self.dev, self.threads))
        parts = [device, info["runtime"], info["version"]]
        if self.runtime == "onnxruntime":
            parts.append(str(info["provider"]).replace("ExecutionProvider", ""))
        parts.append(self.precision)
        return _slug("-".join(parts))

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``onnxruntime 1.32.0 CPUExecutionProvider, 1 thread, batch 1``."""
        info = self.signature_info()
        where = f"{info['device']} (latency server {self.target.url})" if self.target is not None else info["device"]
        return (f"{info['runtime']} {info['version']} {info['provider']}, {self.threads} thread(s), batch "
                f"{self.batch}{', int8 model' if self.precision == 'int8' else ''} on {where}")

    # -- one student ----------------------------------------------------------------------------------------
    def measure(self, spec: StudentSpec, model: nn.Module | None = None,
                max_wait_s: float | None = None) -> tuple[LatencyResult, bool]:
        """(result, cache_hit) for ``spec``: this machine's cache, else measured now under the lock (and cached
        once settled; else pending for `refine`). ``model`` is ``spec`` already built (a trial times the module it
        then trains); ``max_wait_s``: how long slow phases of the host may be waited out (default: the meter's)."""
        sig, key = self.signature(), _cache_key(spec, self.batch)
        hit = self.cache.get(key, sig) if self.cache is not None else None
        if hit is not None:
            return hit, True
        result = self._measure_now(spec, model if model is not None else build_from_spec(spec), key,
                                   self.max_wait_s if max_wait_s is None else max_wait_s)
        if self.cache is not None and result.settled:  # a provisional figure is refined, not kept
            self.cache.put(result, sig)
        return result, False

    def refine(self, spec: StudentSpec, max_wait_s: float, probe: int = 0) -> LatencyResult | None:
        """Go on with ``spec``'s measurement (more rounds, waiting at most ``max_wait_s`` seconds for a fast phase
        of the host; ``probe``: that many rounds while the host is fast, see `protocol.Measurement.take`); the
        result so far, cached (again) when settled. None: no measurement of ``spec`` is open."""
        key = _cache_key(spec, self.batch)
        pending = self._pending.get(key)
        if pending is None:
            return None
        t0 = time.perf_counter()
        with self._quiet():
            pending.measurement.take(max_wait_s, probe)
        result = self._result_of(pending.measurement, key, pending.params, pending.macs,
                                 timing_s=pending.timing_s + time.perf_counter() - t0, anchor=pending.anchor)
        result.export_s, result.quantize_s = pending.export_s, pending.quantize_s
        pending.timing_s = result.timing_s
        if result.settled and self.cache is not None:
            self.cache.put(result, self.signature())
        return result

    def close(self, spec: StudentSpec, result: LatencyResult | None = None) -> LatencyResult | None:
        """Close ``spec``'s measurement (its trial is over, ``result`` its final figure, returned): a later trial
        of it uses the cached figure if it settled, else measures anew."""
        self._pending.pop(_cache_key(spec, self.batch), None)
        return result

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """Timing conditions: no collection mid-run, and no other worker of this machine training (the lock)."""
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection in the middle of a timed run is noise, not model latency
        try:
            # A measurement taken while other workers train on the same cores is wrong. A target is another
            # machine: its server serialises measurements itself, and training here is no noise.
            with self.lock() if self.lock and self.target is None else contextlib.nullcontext():
                yield
        finally:
            if gc_was_enabled:
                gc.enable()

    def export(self, model: nn.Module, input_shape: tuple[int, int, int]) -> bytes:
        """The ONNX bytes ``autokd export`` would write for ``model`` (same function, same example batch)."""
        from autokd.latency.onnx_export import EXAMPLE_BATCH, export_onnx

        was_training, prev_threads = model.training, torch.get_num_threads()
        try:
            model.eval()
            # One thread: tracing a small student gains nothing from more, and on a busy host more threads made
            # the export markedly slower (docs/latency.md, "Exporter"). The graph does not depend on it.
            torch.set_num_threads(1)
            example = torch.zeros(EXAMPLE_BATCH, *input_shape)
            blob, _, _ = export_onnx(model, example)
        finally:
            torch.set_num_threads(prev_threads)
            model.train(was_training)
        return blob

    # -- what is timed (--latency-precision) ----------------------------------------------------------------
    def _onnx_for_timing(self, model: nn.Module, input_shape: tuple[int, int, int],
                         seconds: dict[str, float] | None = None) -> bytes:
        """The ONNX bytes timed for ``model``: its export, quantised to INT8 when the precision is int8 (a few
        random calibration images: they set the scales, not the graph, so not the speed). ``seconds`` receives
        ``export_s`` and ``quantize_s``."""
        t0 = time.perf_counter()
        blob = self.export(model, input_shape)
        t1 = time.perf_counter()
        if self.precision == "int8":
            from autokd.latency.quantize import quantize_for_latency

            blob = quantize_for_latency(blob, input_shape)
        if seconds is not None:
            seconds.update(export_s=t1 - t0, quantize_s=time.perf_counter() - t1 if self.precision == "int8" else 0.0)
        return blob

    def time_onnx(self, onnx: bytes | str | os.PathLike, key: str = "onnx", params: int = 0,
                  macs: int = 0, max_wait_s: float | None = None, keep_open: bool = False,
                  anchor: Anchor | None = None) -> LatencyResult:
        """Time an already-exported ONNX model (bytes or path) with this meter's runtime settings; with ``anchor``,
        interleaved with it, the figure scaled by the anchor's (see :mod:`autokd.latency.anchors`)."""
        if self.runtime != "onnxruntime":
            raise ValueError("timing an ONNX file needs --latency-runtime onnxruntime")
        if self.target is not None:
            return self._time_remote(onnx, key, params, macs)
        t0 = time.perf_counter()
        session = protocol.make_session(onnx, self.threads, self.provider or protocol.DEFAULT_PROVIDER)
        runner = functools.partial(session.run, None, protocol.make_input(session, self.batch))
        runners = {key: runner} if anchor is None else {key: runner, anchor.key: anchor.run}
        measurement = protocol.Measurement(runners, rounds=self.rounds, runs=self.runs, warmup=self.warmup)
        measurement.take(self.max_wait_s if max_wait_s is None else max_wait_s)
        result = self._result_of(measurement, key, params, macs, timing_s=time.perf_counter() - t0, anchor=anchor)
        if keep_open:
            self._pending[key] = _Pending(measurement, params, macs, result.timing_s, anchor=anchor)
        return result

    def _result_of(self, measurement: protocol.Measurement, key: str, params: int, macs: int, timing_s: float,
                   anchor: Anchor | None) -> LatencyResult:
        """The result so far of a measurement of ``key`` (beside ``anchor``, when given)."""
        timings = measurement.timings()
        result = self._result(timings[key], key, params, macs, timing_s=timing_s)
        result.moments = measurement.moments()
        if anchor is not None:
            own, beside = timings[key].median_ms, timings[anchor.key].median_ms
            scale = anchor.panel_ms / beside
            result.median_ms = own * scale
            result.iqr_ms *= scale
            if result.low_ms is not None and result.high_ms is not None:
                result.low_ms, result.high_ms = result.low_ms * scale, result.high_ms * scale
            result.anchor, result.own_ms, result.anchor_ms = anchor.key, own, beside
            result.anchor_panel_ms = anchor.panel_ms
        return result

    # -- anchors (autokd.latency.anchors) -------------------------------------------------------------------
    def anchor_for(self, spec: StudentSpec) -> Anchor | None:
        """The anchor of ``spec``'s family (its panel built and timed on first use), or None: not anchored (the
        meter does not anchor, or the family has no anchor)."""
        if not self.anchored:
            return None
        shape = shape_of(spec)
        if shape not in self._panels:
            self._panels[shape] = self._time_panel(spec)
        return self._panels[shape].get(spec.family)

    def _time_panel(self, like: StudentSpec) -> dict[str, Anchor]:
        """Every family's anchor for students shaped like ``like``, with its panel figure: the cache's, else all
        anchors timed together now (interleaved, like the front's re-timing) and cached. None at all (students timed
        alone) when the panel cannot be timed."""
        sig, shape = self.signature(), (like.in_chans, like.input_size, like.input_size)  # every anchor's input
        built: dict[str, tuple[str, Callable[[], object]]] = {}  # family -> (key, runner)
        sizes: dict[str, tuple[int, int]] = {}  # key -> params, MACs: each anchor is also a student a trial may sample
        for family in (available_families() if self.anchor_families is None else self.anchor_families):
            try:
                spec = anchor_spec(family, like)
                with torch.random.fork_rng(devices=[]):  # fixed weights, and the trial's random stream left alone
                    torch.manual_seed(0)
                    model = build_from_spec(spec)
                session = protocol.make_session(self._onnx_for_timing(model, shape), self.threads,
                                                self.provider or protocol.DEFAULT_PROVIDER)
            except Exception as exc:  # noqa: BLE001 - a family without an anchor is timed alone, not a failed trial
                logger.warning(f"warning: no latency anchor for family {family!r} ({type(exc).__name__}: {exc}); "
                               "its students are timed alone")
                continue
            key = _cache_key(spec, self.batch)
            built[family] = key, functools.partial(session.run, None, protocol.make_input(session, self.batch))
            sizes[key] = count_params(model), count_macs(model, shape)  # here, not under the lock
        results: dict[str, LatencyResult] = {}
        try:
            with self._quiet():  # read under the lock: another worker of this machine may be timing the panel now
                for key, _ in built.values():
                    hit = self.cache.get(key, sig) if self.cache is not None else None
                    if hit is not None:  # a cached figure stays: students measured against it are cached too
                        results[key] = hit
                missing = [key for key, _ in built.values() if key not in results]
                if missing:
                    measurement = protocol.Measurement(dict(built.values()),
                                                       rounds=self.rounds, runs=self.runs, warmup=self.warmup)
                    measurement.take(self.max_wait_s)
                    timings = measurement.timings()
                for key in missing:
                    results[key] = self._result(timings[key], key, *sizes[key], timing_s=measurement.seconds)
                    if self.cache is not None:  # also when unsettled: the panel is the folder's scale, and every
                        self.cache.put(results[key], sig)  # later meter on it must use the same one
        except Exception as exc:  # noqa: BLE001 - without a panel, students are timed alone; trials go on
            logger.warning(f"warning: the latency anchors could not be timed ({type(exc).__name__}: {exc}); "
                           "students are timed alone")
            return {}
        return {family: Anchor(key, run, results[key]) for family, (key, run) in built.items()}

    def _time_remote(self, onnx: bytes | str | os.PathLike, key: str, params: int, macs: int) -> LatencyResult:
        from autokd.latency.remote.client import RemoteLatencyError

        blob = onnx if isinstance(onnx, bytes) else Path(onnx).read_bytes()
        t0 = time.perf_counter()
        found, signature = self.target.measure(blob, self.batch, self.threads)
        # The study is pinned to the target's device: a server restarted on other hardware must not slip in.
        changed = [k for k in ("device", "runtime", "version", "provider", "threads")
                   if signature.get(k) != self.target_info.get(k)]
        if changed:
            raise RemoteLatencyError(f"latency target {self.target.url} now reports another "
                                     f"{', '.join(f'{k} {signature.get(k)!r} (was {self.target_info.get(k)!r})' for k in changed)}")
        timing = protocol.Timing(**{f.name: found[f.name] for f in fields(protocol.Timing) if f.name in found})
        result = self._result(timing, key, params, macs, timing_s=time.perf_counter() - t0)
        result.host, result.device = self.target.url, str(self.target_info["device"])
        return result

    def _measure_now(self, spec: StudentSpec, model: nn.Module, key: str, max_wait_s: float) -> LatencyResult:
        shape = (spec.in_chans, spec.input_size, spec.input_size)
        params = count_params(model)
        macs = count_macs(model, shape)
        anchor = self.anchor_for(spec)  # the panel is built and timed on first use
        if anchor is not None and anchor.key == key:  # the family's anchor itself: its panel figure, as cached
            return LatencyResult.from_dict(anchor.result.to_dict())
        blob, prep_s = None, {"export_s": 0.0, "quantize_s": 0.0}
        if self.runtime == "onnxruntime":  # exporting (and quantising) needs no quiet cores: done before the lock
            blob = self._onnx_for_timing(model, shape, prep_s)
        with self._quiet():
            if blob is not None:
                result = self.time_onnx(blob, key, params, macs, max_wait_s, keep_open=True, anchor=anchor)
                result.export_s, result.quantize_s = prep_s["export_s"], prep_s["quantize_s"]
                if key in self._pending:
                    self._pending[key].export_s, self._pending[key].quantize_s = result.export_s, result.quantize_s
                return result
            timing = self.time_models({key: model}, {key: shape})[key]
        return self._result(timing, key, params, macs, timing_s=timing.seconds)

    def _result(self, timing: protocol.Timing, key: str, params: int, macs: int, timing_s: float = 0.0) -> LatencyResult:
        return LatencyResult(
            median_ms=timing.median_ms, iqr_ms=timing.spread_ms, runs=len(timing.rounds) * timing.runs_per_round,
            batch_size=self.batch, threads=self.threads, device=_device_name(self.dev), host=socket.gethostname(),
            params=params, macs=macs, key=key, runtime=self.runtime, low_ms=timing.low_ms, high_ms=timing.high_ms,
            rounds=len(timing.rounds), timing_s=timing_s,
            host_slowdown=round(timing.host_slowdown, 4), settled=timing.settled, slow_rounds=timing.slow_rounds,
            waited_s=round(timing.waited_s, 4), precision=self.precision, reference_ms=round(timing.reference_ms, 5))

    # -- several students together --------------------------------------------------------------------------
    def time_models(self, models: dict[str, nn.Module], shapes: dict[str, tuple[int, int, int]],
                    seed: int = 0) -> dict[str, protocol.Timing]:
        """Time several models together, interleaved in shuffled rounds (one process, one slow phase hits all)."""
        if self.target is not None:
            raise ValueError("timing several models together needs them on this machine, not a latency target")
        prev_threads = torch.get_num_threads()
        states = {name: (m, m.training, _model_device(m)) for name, m in models.items()}
        try:
            if self.runtime == "onnxruntime":
                sessions = {name: protocol.make_session(self._onnx_for_timing(m, shapes[name]), self.threads,
                                                          self.provider or protocol.DEFAULT_PROVIDER)
                            for name, m in models.items()}
                return protocol.time_sessions(sessions, batch=self.batch, rounds=self.rounds, runs=self.runs,
                                                warmup=self.warmup, seed=seed)
            torch.set_num_threads(self.threads)
            # A private generator: timing must not move the caller's random stream (a trial trains next).
            gen = torch.Generator(device=self.dev).manual_seed(0)
            feeds = {name: (m.to(self.dev).eval(), torch.randn(self.batch, *shapes[name], device=self.dev,
                                                               generator=gen)) for name, m in models.items()}
            return _torch_timings(feeds, self.dev, self.rounds, self.runs, self.warmup, seed=seed)
        finally:
            torch.set_num_threads(prev_threads)
            for m, training, device in states.values():
                m.to(device).train(training)

    def retime(self, specs: dict[str, StudentSpec], seed: int = 0) -> dict[str, LatencyResult]:
        """Re-time students (name -> spec) together, interleaved in shuffled rounds; name -> result."""
        models = {name: build_from_spec(spec) for name, spec in specs.items()}
        shapes = {name: (spec.in_chans, spec.input_size, spec.input_size) for name, spec in specs.items()}
        t0 = time.perf_counter()
        with self.lock() if self.lock else contextlib.nullcontext():
            timings = self.time_models(models, shapes, seed=seed)
        seconds = time.perf_counter() - t0
        return {name: self._result(timings[name], _cache_key(specs[name], self.batch), count_params(models[name]),
                                   0, timing_s=seconds) for name in specs}


__all__ = [
    "LatencyCache", "LatencyMeter", "LatencyResult", "MeasureLock", "RUNTIMES", "count_macs", "count_params",
    "default_runtime", "device_signature",
]

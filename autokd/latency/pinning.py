"""One latency device per study: pinning it on first use, refusing a worker that would time on another, and
the study-wide record of each architecture's first measurement, so all machines use one figure."""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Callable, ContextManager

from autokd.errors import UserError
from autokd.latency.meter import LatencyMeter, LatencyResult
from autokd.study.record import LATENCY_BATCH_ATTR, LATENCY_DEVICE_ATTR, LATENCY_MIXED_ATTR, LATENCY_SETTINGS_ATTR

if TYPE_CHECKING:
    import optuna
    from torch import nn

    from autokd.model.students import StudentSpec

logger = logging.getLogger(__name__)


class StudyLatency:
    """Latencies kept in the study itself (user attributes), so all machines use one measurement per architecture.

    Each machine's own cache (`LatencyCache`) holds its own measurements; two machines of one kind still time the
    same student a little differently (load, thermal state), which would put one architecture at two latencies
    in the front. The first measurement recorded in the study wins. It wraps the worker's meter: ``measure`` is
    the meter's, the study's figure first. ``lock`` (the study lock, across machines) makes "record unless
    recorded" one step: without it, two workers that measured the same architecture at once could both record.
    """

    def __init__(self, study: optuna.Study, meter: LatencyMeter,
                 lock: Callable[[], ContextManager[None]] | None = None) -> None:
        self.study, self.meter, self.lock = study, meter, lock
        self.prefix = f"latency:{meter.signature()}:b{meter.batch}:"

    def measure(self, spec: StudentSpec, model: nn.Module | None = None,
                max_wait_s: float | None = None) -> tuple[LatencyResult, bool]:
        """(result, cache_hit) for ``spec`` as `LatencyMeter.measure`, but the study's figure when it has one (a hit),
        and a new measurement recorded in the study (unless another worker recorded one first, which then counts)."""
        found = self.get(spec.key)
        if found is not None:
            return found, True
        result, hit = self.meter.measure(spec, model, max_wait_s)
        return self._record_if_settled(spec, result), hit

    def refine(self, spec: StudentSpec, max_wait_s: float, probe: int = 0) -> LatencyResult | None:
        """`LatencyMeter.refine` until the figure settles; then it is recorded (or the one recorded first is taken)."""
        result = self.meter.refine(spec, max_wait_s, probe)
        return None if result is None else self._record_if_settled(spec, result)

    def close(self, spec: StudentSpec, result: LatencyResult | None = None) -> LatencyResult | None:
        """`LatencyMeter.close`."""
        return self.meter.close(spec, result)

    def _record_if_settled(self, spec: StudentSpec, result: LatencyResult) -> LatencyResult:
        # One figure per architecture across machines: the first settled one is recorded at once and not refined
        # further (the measurement is closed), so every worker's trials of it use the same figure.
        if not result.settled:
            return result
        self.meter.close(spec)
        return self.put(spec.key, result)

    def get(self, arch_key: str) -> LatencyResult | None:
        """The study's measurement of `arch_key` on this device kind, or None."""
        found = self.study.user_attrs.get(self.prefix + arch_key)
        return LatencyResult.from_dict(found) if found else None

    def put(self, arch_key: str, result: LatencyResult) -> LatencyResult:
        """Record `result` unless another worker recorded this architecture first; returns the one that counts."""
        with self.lock() if self.lock is not None else contextlib.nullcontext():
            first = self.get(arch_key)
            if first is not None:
                return first
            self.study.set_user_attr(self.prefix + arch_key, result.to_dict())
        return result


def check_latency_device(study: optuna.Study, signature: str, batch: int, allow_mixed: bool,
                         settings: dict[str, Any] | None = None) -> None:
    """Pin the study's latency device on first use; refuse a worker that would time students on another one.

    The signature names the device, the runtime (onnxruntime or torch), its version, execution provider and the
    thread count; ``settings`` is the same as a dict, recorded beside it (``latency_settings``) so the report can
    re-time the front with them. Call under the study lock. Raises UserError (exit 2) on a mismatch unless
    `allow_mixed`.
    """
    attrs = study.user_attrs
    stored, stored_batch = attrs.get(LATENCY_DEVICE_ATTR), attrs.get(LATENCY_BATCH_ATTR)
    if stored is None:
        study.set_user_attr(LATENCY_DEVICE_ATTR, signature)
        study.set_user_attr(LATENCY_BATCH_ATTR, batch)
        if settings is not None:
            study.set_user_attr(LATENCY_SETTINGS_ATTR, settings)
        return
    if stored == signature and (stored_batch is None or stored_batch == batch):
        return
    what = (f"device {signature!r} (study: {stored!r})" if stored != signature
            else f"batch size {batch} (study: {stored_batch})")
    stored_settings = attrs.get(LATENCY_SETTINGS_ATTR) or {}
    _check_latency_precision(study, stored_settings, settings)
    if settings and stored_settings:
        diff = [f"{k} {settings.get(k)!r} (study: {stored_settings.get(k)!r})" for k in sorted(settings)
                if settings.get(k) != stored_settings.get(k)]
        what += f": {', '.join(diff)}" if diff else ""
    if allow_mixed:
        logger.warning(f"warning: study {study.study_name!r}: this worker measures latency with {what}; mixed in "
                       "one front because --allow-mixed-latency was given")
        study.set_user_attr(LATENCY_MIXED_ATTR, True)
        return
    runtime = stored_settings.get("runtime", "torch")
    raise UserError(
        f"study {study.study_name!r} measures latency on {stored!r} with batch {stored_batch}, but this worker "
        f"would measure it with {what}. Latencies from different hardware or runtimes are not comparable in one "
        "Pareto front. Run this worker on the same kind of machine with the study's settings (--latency-runtime "
        f"{runtime}, --latency-device, --latency-threads, --latency-batch), or pass --allow-mixed-latency to mix "
        "them knowingly.")


def _check_latency_precision(study: optuna.Study, stored_settings: dict[str, Any],
                             settings: dict[str, Any] | None) -> None:
    """One precision per study (``--latency-precision``), even with --allow-mixed-latency: an fp32 and an int8
    latency of one student are different deployments."""
    stored, wanted = stored_settings.get("precision"), (settings or {}).get("precision")
    if wanted != stored:
        raise UserError(
            f"study {study.study_name!r} times its students' {stored} ONNX models (latency precision {stored}), but "
            f"this worker would time their {wanted} models (--latency-precision {wanted}). A study keeps one "
            f"precision, also with --allow-mixed-latency: resume it with --latency-precision {stored}, or start a "
            "new study with --study NEW_NAME.")

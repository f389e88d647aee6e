"""Before a report: re-time every front candidate together, so the front is not decided by a slow phase of the host.

Each trial timed its own student alone, at some moment of the search. Here every COMPLETE student within
:data:`MARGIN` of the front (in latency) is exported again and timed together with the others, interleaved in
shuffled rounds in one process: a slow phase of the host then hits them all alike. The figures go into the
study (user attribute ``latency_retime``, per architecture) and from there into the report, its
recommendations and ``autokd export``; each trial's first measurement stays in its own ``latency`` attribute.
The study is re-timed only on its own latency device (same signature); elsewhere the stored figures are used.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

from autokd.select.pareto import TrialPoint, dominates

if TYPE_CHECKING:
    import optuna

    from autokd.model.data import DataSplits


MARGIN = 0.25   # a student up to 25 % slower than what would keep it on the front is re-timed too
MAX_CANDIDATES = 40

logger = logging.getLogger(__name__)


def candidates(points: Sequence[TrialPoint], margin: float = MARGIN) -> list[TrialPoint]:
    """COMPLETE points that would be on the front if their latency were ``1 + margin`` times smaller."""
    ok = [p for p in points if p.state == "COMPLETE" and p.val_acc is not None and p.latency_ms is not None]
    out = []
    for p in ok:
        lat = p.latency_ms / (1.0 + margin)  # type: ignore[operator]
        if not any(q is not p and dominates((q.val_acc, q.latency_ms), (p.val_acc, lat)) for q in ok):
            out.append(p)
    out.sort(key=lambda p: (p.latency_ms, -p.val_acc))  # type: ignore[operator]
    return out[:MAX_CANDIDATES]


def stored(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """arch_key -> re-timed latency (``median_ms``, ``low_ms``, ``high_ms``) valid for the study's latency device."""
    from autokd.study.record import LATENCY_DEVICE_ATTR, LATENCY_RETIME_ATTR

    record = study.user_attrs.get(LATENCY_RETIME_ATTR) or {}
    if not record or record.get("signature") != study.user_attrs.get(LATENCY_DEVICE_ATTR):
        return {}
    return record.get("archs") or {}


def retime_front(study: optuna.Study, points: Sequence[TrialPoint], data: DataSplits) -> dict[str, dict[str, Any]]:
    """Re-time the front candidates of ``points`` together (see the module doc) and record them in the study.

    Returns what :func:`stored` then returns. Skipped (stored figures kept) when this machine is not the study's
    latency device, when the study predates recorded latency settings, or when the candidates were already
    re-timed together.
    """
    from autokd.latency.meter import LatencyMeter
    from autokd.model.students import resolve_student
    from autokd.study.record import (
        LATENCY_DEVICE_ATTR,
        LATENCY_MIXED_ATTR,
        LATENCY_RETIME_ATTR,
        LATENCY_SETTINGS_ATTR,
        sampled_params,
    )

    attrs = study.user_attrs
    settings = attrs.get(LATENCY_SETTINGS_ATTR)
    previous = stored(study)
    if not settings:
        return previous
    if attrs.get(LATENCY_MIXED_ATTR):
        logger.info("latency: not re-timed (the study mixes latency devices: --allow-mixed-latency)")
        return previous
    try:
        meter = LatencyMeter(settings.get("runtime"), settings.get("torch_device", "cpu"), settings["threads"],
                             settings.get("batch", 1), precision=settings.get("precision"))  # older: fp32
    except Exception as exc:  # noqa: BLE001 - no such device or runtime here: keep the stored figures
        logger.info(f"latency: not re-timed here ({exc})")
        return previous
    if meter.signature() != attrs.get(LATENCY_DEVICE_ATTR):
        logger.info(f"latency: the front is not re-timed on this machine ({meter.signature()}; the study's latency "
                    f"device is {attrs.get(LATENCY_DEVICE_ATTR)}); the report uses the figures measured there")
        return previous
    chosen = candidates(points)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    specs = {}
    for p in chosen:
        key = p.arch_key
        if not key or key in specs:
            continue
        flat = sampled_params(trials[p.number].user_attrs)
        spec = resolve_student(flat["family"], float(flat["width"]), float(flat["depth"]),
                               num_classes=data.num_classes, in_chans=data.in_chans, input_size=data.input_size)
        if spec.key == key:  # otherwise the data's shape changed since: leave that trial's figure alone
            specs[key] = spec
    if not specs or set(specs) <= set(previous):  # already re-timed together (an `autokd report` rerun)
        return previous
    t0 = time.perf_counter()
    try:
        results = meter.retime(specs)
    except Exception as exc:  # noqa: BLE001 - the report must still be written, with the first measurements
        logger.warning(f"warning: latency: could not re-time the front candidates ({exc.__class__.__name__}: {exc}); "
                       "the report uses each trial's own measurement")
        return previous
    seconds = time.perf_counter() - t0
    archs = {key: {"median_ms": r.median_ms, "low_ms": r.low_ms, "high_ms": r.high_ms, "rounds": r.rounds}
             for key, r in results.items()}
    study.set_user_attr(LATENCY_RETIME_ATTR, {
        "signature": meter.signature(), "archs": archs, "seconds": round(seconds, 2), "runtime": meter.describe(),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "protocol": (
            f"{meter.rounds} shuffled rounds x {meter.runs} runs, all candidates interleaved; minimum per round, "
            "median over rounds")})
    logger.info(f"latency: re-timed {len(specs)} front candidate(s) together in {seconds:.1f} s ({meter.describe()})")
    return archs


def apply(points: Sequence[TrialPoint], archs: dict[str, dict[str, Any]]) -> None:
    """Put the re-timed figures into ``points`` (the first measurement stays in their ``latency_first_ms``)."""
    for p in points:
        found = archs.get(p.arch_key or "")
        if found and p.latency_ms is not None:
            if p.latency_first_ms is None:  # applied twice (stored figures, then a new re-timing): keep the first
                p.latency_first_ms = p.latency_ms
            p.latency_ms = float(found["median_ms"])
            if found.get("low_ms") is not None and found.get("high_ms") is not None:
                p.latency_ci = (float(found["low_ms"]), float(found["high_ms"]))

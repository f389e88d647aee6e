"""Pareto front of (validation accuracy maximize, latency minimize), its knee, hypervolume and picks.

Accuracies are fractions in [0, 1] (as ``autokd.train.evaluate`` returns them); tolerances given in
percentage points are divided by 100. Every function accepts either :class:`TrialPoint` objects or plain
``(accuracy, latency_ms)`` pairs. Only COMPLETE trials with finite accuracy and latency enter a front (a
pruned trial's partial accuracy is not comparable with a finished one); pairs enter when both are finite.
Dominance and non-dominated sorting live here too, for the rung pruner (:mod:`autokd.select.pruning`). Report files
are written by :mod:`autokd.report.render`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Union

__all__ = [
    "TrialPoint",
    "check_hv_ref",
    "check_picks",
    "front_points",
    "hypervolume",
    "dominates",
    "is_finite",
    "knee_index",
    "nondominated_fronts",
    "pareto_front",
    "recommend",
    "tied",
    "ties",
    "wilson_interval",
]

RECOMMENDATION_KEYS = ("knee", "best_under_latency", "fastest_within_tolerance")


@dataclass
class TrialPoint:
    """One trial as the front and the report see it.

    ``state`` is the trial's state name (a value of :class:`autokd.study.record.State`, e.g. ``"COMPLETE"``): only
    COMPLETE points enter a front. The keyword-only fields are what the study recorded beside the objectives
    (``autokd.report.build.trial_points``); None where it recorded nothing.
    """

    number: int
    state: str
    val_acc: float | None
    latency_ms: float | None
    params: dict = field(default_factory=dict)
    test_acc: float | None = None
    acc_ci: tuple[float, float] | None = None      # binomial (Wilson) interval of val_acc
    latency_ci: tuple[float, float] | None = None  # interval of latency_ms from its measurement
    _: KW_ONLY
    arch_key: str | None = None          # the student's architecture: the front's re-timing is keyed by it
    epochs: int | None = None            # epochs trained (the length of its validation curve)
    last_val_acc: float | None = None    # its last validation accuracy: where a pruned trial is drawn
    param_count: int | None = None       # the student's parameters: tied picks are settled towards fewer
    reason: str | None = None            # why the trial failed
    latency_first_ms: float | None = None  # its own measurement, where latency_ms is the front's re-timing
    # A --latency-precision int8 study's front: test accuracy of its fp32 and its INT8 ONNX model (ONNX Runtime).
    fp32_test_acc: float | None = None
    int8_test_acc: float | None = None


PointLike = Union[TrialPoint, Sequence[float]]


def is_finite(x: Any) -> bool:
    """True for a finite int or float (a bool, None or any other type is not a number here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _coords(p: PointLike) -> tuple[float, float] | None:
    """``(accuracy, latency)`` of a point eligible for a front, else None."""
    if isinstance(p, TrialPoint):
        if p.state != "COMPLETE" or not (is_finite(p.val_acc) and is_finite(p.latency_ms)):
            return None
        return float(p.val_acc), float(p.latency_ms)  # type: ignore[arg-type]
    acc, lat = p
    if not (is_finite(acc) and is_finite(lat)):
        return None
    return float(acc), float(lat)


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(accuracy, latency) ``a`` is at least as good as ``b`` on both and better on one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def _first_front(items: Sequence[tuple[int, tuple[float, float]]]) -> list[int]:
    """Indices of the non-dominated ``(index, (accuracy, latency))`` items, which must come sorted by latency
    ascending, then accuracy descending; the result keeps that order.

    A sweep instead of pairwise :func:`dominates` tests, with the same answer: an item is non-dominated iff it is
    strictly more accurate than every strictly faster item and as accurate as the best at its own latency.
    """
    front: list[int] = []
    best_faster: float | None = None  # best accuracy among strictly faster items (None: there are none)
    k = 0
    while k < len(items):
        lat = items[k][1][1]
        group = []
        while k < len(items) and items[k][1][1] == lat:
            group.append(items[k])
            k += 1
        top = group[0][1][0]
        if best_faster is None or top > best_faster:
            front.extend(i for i, (acc, _) in group if acc == top)
            best_faster = top
    return front


def _by_latency(items: list[tuple[int, tuple[float, float]]]) -> list[tuple[int, tuple[float, float]]]:
    return sorted(items, key=lambda ic: (ic[1][1], -ic[1][0], ic[0]))


def pareto_front(points: Sequence[PointLike]) -> list[int]:
    """Indices of the non-dominated eligible points, ordered by latency ascending (then accuracy descending).

    A point is dominated if another is at least as accurate and at least as fast, and strictly better in
    one. Exact duplicates do not dominate each other, so both are kept (they are different trials that
    reached the same result; dropping one arbitrarily would hide it).
    """
    return _first_front(_by_latency([(i, c) for i, p in enumerate(points) if (c := _coords(p)) is not None]))


def nondominated_fronts(points: Sequence[tuple[float, float]]) -> list[list[int]]:
    """Non-dominated sorting of ``(accuracy, latency_ms)`` points (accuracy maximized, latency minimized).

    Returns fronts as lists of indices into ``points``, best front first, indices ascending within a front;
    front k is the non-dominated set of the points fronts 1..k-1 leave. Identical points do not
    dominate each other, so duplicates and ties share a front. Every point is ranked: a NaN accuracy counts
    as -inf and a NaN latency as +inf (worst), so the order stays total.
    """
    def worst_for_nan(acc: float, lat: float) -> tuple[float, float]:
        acc, lat = float(acc), float(lat)
        return (-math.inf if math.isnan(acc) else acc), (math.inf if math.isnan(lat) else lat)

    remaining = _by_latency([(i, worst_for_nan(acc, lat)) for i, (acc, lat) in enumerate(points)])
    fronts: list[list[int]] = []
    while remaining:  # each pass takes at least the first item (nothing is faster than it), so this ends
        front = _first_front(remaining)
        fronts.append(sorted(front))
        taken = set(front)
        remaining = [item for item in remaining if item[0] not in taken]
    return fronts


def front_points(points: Sequence[TrialPoint]) -> list[TrialPoint]:
    """The front as TrialPoint objects, ordered by latency ascending."""
    return [points[i] for i in pareto_front(points)]


def knee_index(front_points: Sequence[PointLike]) -> int:
    """Index (into ``front_points``) of the knee of a front.

    Both axes are min-max normalised over the given points; the knee is the point with the largest
    distance to the line joining the two extreme points (fastest, most accurate), measured towards the
    ideal corner (high accuracy, low latency) so a concave dent is never chosen. Ties, and fronts of 1 or
    2 points (where every distance is 0), resolve to the most accurate point, then the faster, then the
    lower index: with no trade-off to read, accuracy is what distillation was run for.
    Non-eligible points (non-COMPLETE or non-finite) are ignored; raises ValueError if none is eligible.
    """
    pts = [(i, c) for i, p in enumerate(front_points) if (c := _coords(p)) is not None]
    if not pts:
        raise ValueError("knee_index needs at least one COMPLETE point with finite accuracy and latency")
    accs = [c[0] for _, c in pts]
    lats = [c[1] for _, c in pts]
    a_lo, a_span = min(accs), (max(accs) - min(accs)) or 1.0
    l_lo, l_span = min(lats), (max(lats) - min(lats)) or 1.0
    norm = [(i, ((acc - a_lo) / a_span, (lat - l_lo) / l_span)) for i, (acc, lat) in pts]
    # x = normalised latency, y = normalised accuracy; extremes: fastest (ties: most accurate) and most
    # accurate (ties: fastest)
    fast = min(norm, key=lambda t: (t[1][1], -t[1][0]))[1]
    acc_ = max(norm, key=lambda t: (t[1][0], -t[1][1]))[1]
    dx, dy = acc_[1] - fast[1], acc_[0] - fast[0]
    length = math.hypot(dx, dy)

    def signed_distance(c: tuple[float, float]) -> float:
        if length == 0.0:
            return 0.0
        # cross product of (extreme line) x (point - fast); positive on the ideal-corner side
        px, py = c[1] - fast[1], c[0] - fast[0]
        return (dx * py - dy * px) / length

    best = max(norm, key=lambda t: (round(signed_distance(t[1]), 12), t[1][0], -t[1][1], -t[0]))
    return best[0]


def check_hv_ref(ref: Sequence[float]) -> tuple[float, float]:
    """A hypervolume reference point given by the caller, as ``(accuracy, latency_ms)`` floats; ValueError unless
    it is two finite numbers."""
    if len(ref) != 2 or not all(is_finite(v) for v in ref):
        raise ValueError(f"hypervolume reference must be two finite numbers (accuracy, latency_ms), got {ref!r}")
    return float(ref[0]), float(ref[1])


def hypervolume(points: Sequence[PointLike], ref: tuple[float, float]) -> float:
    """Exact 2-D hypervolume (area, in accuracy x ms) dominated by ``points`` and bounded by ``ref``.

    ``ref = (ref_accuracy, ref_latency_ms)``; only the region with accuracy >= ref_accuracy and latency <=
    ref_latency counts, so points beyond the reference add nothing. Dominated points add nothing either.
    """
    ref_acc, ref_lat = ref
    if not (is_finite(ref_acc) and is_finite(ref_lat)):
        raise ValueError(f"hypervolume reference must be finite (accuracy, latency_ms), got {ref!r}")
    inside = [c for p in points if (c := _coords(p)) is not None and c[0] > ref_acc and c[1] < ref_lat]
    front = [inside[i] for i in pareto_front(inside)]  # latency ascending => accuracy ascending
    area = 0.0
    for k, (acc, lat) in enumerate(front):
        next_lat = front[k + 1][1] if k + 1 < len(front) else ref_lat
        # between this point's latency and the next one's, this point is the most accurate available
        area += (next_lat - lat) * (acc - ref_acc)
    return area


def wilson_interval(acc: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (~95 % for z = 1.96) of an accuracy measured on ``n`` images."""
    if n <= 0 or not is_finite(acc):
        return (0.0, 1.0)
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _overlap(a: tuple[float, float] | None, b: tuple[float, float] | None, va: Any, vb: Any) -> bool:
    if a is None or b is None:  # no interval known: only equal values are indistinguishable
        return va == vb
    return a[0] <= b[1] and b[0] <= a[1]


def tied(a: TrialPoint, b: TrialPoint) -> bool:
    """True when the intervals of ``a`` and ``b`` overlap on both axes: the data cannot tell them apart."""
    return (_overlap(a.acc_ci, b.acc_ci, a.val_acc, b.val_acc)
            and _overlap(a.latency_ci, b.latency_ci, a.latency_ms, b.latency_ms))


def ties(front: Sequence[TrialPoint]) -> dict[int, list[int]]:
    """Trial number -> the other front members it is tied with (see :func:`tied`); members with none are left out."""
    out: dict[int, list[int]] = {}
    for p in front:
        others = [q.number for q in front if q is not p and tied(p, q)]
        if others:
            out[p.number] = others
    return out


def _param_count(p: TrialPoint) -> float:
    n = p.param_count
    return float(n) if is_finite(n) else math.inf


def _settle(pick: TrialPoint, group: Sequence[TrialPoint]) -> TrialPoint:
    """Among ``pick`` and the points tied with it, the one chosen without reading noise: fewest parameters (a
    difference that is not measured), then the most accurate, then the faster, then the lower trial number."""
    return min([pick, *group], key=lambda p: (_param_count(p), -p.val_acc, p.latency_ms, p.number))  # type: ignore


TIE_RULE = ("front members whose intervals overlap on both axes (latency: the interval of the median of per-round "
            "minima; accuracy: 95 % Wilson interval on the validation images) are tied: the data cannot order them. "
            "The knee and the fastest student within tolerance are never chosen on such a difference: among the "
            "pick and the students tied with it (for 'fastest', those within tolerance whose latency intervals "
            "overlap the fastest's), the one with the fewest parameters is recommended, then the most accurate")


def check_picks(max_latency_ms: float | None, tolerance_pp: float) -> None:
    """The limits :func:`recommend` takes: ValueError unless ``max_latency_ms`` (when given) is a positive number
    of milliseconds and ``tolerance_pp`` a finite number of percentage points >= 0."""
    if max_latency_ms is not None and not (is_finite(max_latency_ms) and max_latency_ms > 0):
        raise ValueError(f"max latency must be a positive number of milliseconds, got {max_latency_ms!r}")
    if not (is_finite(tolerance_pp) and tolerance_pp >= 0):
        raise ValueError(f"accuracy tolerance must be >= 0 percentage points, got {tolerance_pp!r}")


def recommend(front: Sequence[TrialPoint], max_latency_ms: float | None = None,
              tolerance_pp: float = 1.0) -> dict[str, TrialPoint | None]:
    """Picks from a front (non-front or non-eligible points passed in are filtered out first).

    Returns a dict with keys:
      ``knee``: see :func:`knee_index` (None for an empty front), settled among tied points (:data:`TIE_RULE`);
      ``best_under_latency``: most accurate with latency <= ``max_latency_ms`` (None if not given or none fits);
      ``fastest_within_tolerance``: fastest with accuracy >= best - ``tolerance_pp`` percentage points,
      settled among those within tolerance whose latency intervals overlap its own (:data:`TIE_RULE`).
    """
    check_picks(max_latency_ms, tolerance_pp)
    pts = front_points(list(front))
    out: dict[str, TrialPoint | None] = dict.fromkeys(RECOMMENDATION_KEYS)
    if not pts:
        return out
    knee = pts[knee_index(pts)]
    out["knee"] = _settle(knee, [q for q in pts if q is not knee and tied(q, knee)])
    acc_first = lambda p: (p.val_acc, -p.latency_ms, -p.number)  # noqa: E731
    if max_latency_ms is not None:
        fits = [p for p in pts if p.latency_ms <= max_latency_ms]  # type: ignore[operator]
        out["best_under_latency"] = max(fits, key=acc_first) if fits else None
    best = max(p.val_acc for p in pts)  # type: ignore[type-var]
    # small epsilon: 0.93 - 1pp must admit 0.92 despite binary floating point
    floor = best - tolerance_pp / 100.0 - 1e-12
    within = [p for p in pts if p.val_acc >= floor]  # type: ignore[operator]
    fastest = min(within, key=lambda p: (p.latency_ms, -p.val_acc, p.number))
    out["fastest_within_tolerance"] = _settle(fastest, [
        q for q in within if q is not fastest and _overlap(q.latency_ci, fastest.latency_ci, q.latency_ms,
                                                           fastest.latency_ms)])
    return out

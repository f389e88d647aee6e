from __future__ import annotations

import math

import pytest

from autokd.select.pareto import (
    TrialPoint,
    front_points,
    hypervolume,
    knee_index,
    nondominated_fronts,
    pareto_front,
    recommend,
)


def tp(number: int, acc: float | None, lat: float | None, state: str = "COMPLETE", **params: object) -> TrialPoint:
    return TrialPoint(number=number, state=state, val_acc=acc, latency_ms=lat, params=dict(params))


# ---------------------------------------------------------------- pareto_front

def test_front_excludes_dominated_and_orders_by_latency() -> None:
    pts = [(0.90, 5.0), (0.60, 1.0), (0.80, 5.0), (0.85, 2.0), (0.70, 3.0), (0.95, 9.0)]
    # (0.80,5) is dominated by (0.90,5); (0.70,3) by (0.85,2)
    assert pareto_front(pts) == [1, 3, 0, 5]


def test_front_keeps_exact_duplicates_and_drops_same_latency_worse() -> None:
    pts = [(0.9, 2.0), (0.9, 2.0), (0.8, 2.0), (0.9, 3.0), (0.5, 1.0)]
    # both copies of (0.9, 2.0) are kept; (0.8, 2.0) same latency less accurate; (0.9, 3.0) same acc slower
    assert pareto_front(pts) == [4, 0, 1]


def test_front_only_complete_and_finite_trial_points() -> None:
    pts = [
        tp(0, 0.80, 2.0),
        tp(1, 0.99, 0.1, state="PRUNED"),      # would dominate everything, but pruned trials never enter
        tp(2, None, 1.0, state="INFEASIBLE"),
        tp(3, math.nan, 1.0),                  # complete but not finite
        tp(4, 0.70, math.inf),
        tp(5, 0.75, 1.0),
        tp(6, 0.95, 0.5, state="FAIL"),
        tp(7, 0.97, 0.3, state="RUNNING"),
    ]
    assert pareto_front(pts) == [5, 0]
    assert [p.number for p in front_points(pts)] == [5, 0]
    assert pareto_front([]) == []


def test_front_of_ties_in_latency_and_accuracy() -> None:
    pts = [(0.8, 1.0), (0.8, 2.0), (0.9, 2.0), (0.9, 1.5)]
    # (0.8, 2.0) dominated by (0.8, 1.0); (0.9, 2.0) dominated by (0.9, 1.5)
    assert pareto_front(pts) == [0, 3]


# ---------------------------------------------------------------- nondominated_fronts (the rung pruner's ranking)

def test_fronts_simple_chain() -> None:
    # (acc, latency): 0 is best in both, 2 is dominated by 1, which is dominated by 0
    assert nondominated_fronts([(0.9, 1.0), (0.8, 2.0), (0.7, 3.0)]) == [[0], [1], [2]]


def test_fronts_tradeoff_and_duplicates() -> None:
    pts = [
        (0.9, 5.0),  # 0 accurate, slow            -> front 1
        (0.6, 1.0),  # 1 fast, inaccurate          -> front 1
        (0.9, 5.0),  # 2 exact duplicate of 0      -> front 1 too (duplicates never dominate each other)
        (0.8, 5.0),  # 3 dominated by 0 (same latency, less accurate) -> front 2
        (0.6, 2.0),  # 4 dominated by 1 (same acc, slower)            -> front 2
        (0.5, 6.0),  # 5 dominated by 3 and 4                         -> front 3
    ]
    assert nondominated_fronts(pts) == [[0, 1, 2], [3, 4], [5]]


def test_fronts_empty_and_nan() -> None:
    assert nondominated_fronts([]) == []
    # NaN accuracy ranks as -inf: dominated by any point at least as fast
    assert nondominated_fronts([(math.nan, 1.0), (0.5, 1.0)]) == [[1], [0]]


def test_fronts_are_the_dominance_definition() -> None:
    """The sweep behind both front functions gives what pairwise ``dominates`` tests give (ties included)."""
    import random

    from autokd.select.pareto import dominates

    rng = random.Random(0)
    for _ in range(300):
        pts = [(rng.choice([0.5, 0.7, 0.9]), rng.choice([1.0, 2.0, 3.0])) for _ in range(rng.randint(0, 8))]
        left, expected = list(range(len(pts))), []
        while left:
            front = [i for i in left if not any(dominates(pts[j], pts[i]) for j in left)]
            expected.append(front)
            left = [i for i in left if i not in front]
        assert nondominated_fronts(pts) == expected
        assert sorted(pareto_front(pts)) == (expected[0] if expected else [])


# ---------------------------------------------------------------- knee_index

def test_knee_on_l_shaped_front() -> None:
    # (acc, latency): accuracy jumps from 0.50 to 0.90 for +1 ms, then creeps to 0.93 for +18 ms.
    front = [(0.50, 1.0), (0.90, 2.0), (0.92, 10.0), (0.93, 20.0)]
    assert knee_index(front) == 1
    # order of input does not matter; the index refers to the input
    assert knee_index(list(reversed(front))) == 2


def test_knee_mirror_l_shape() -> None:
    # fast points are nearly as good, the knee is the fast corner (0.92, 1.2)
    front = [(0.50, 1.0), (0.92, 1.2), (0.93, 20.0)]
    assert knee_index(front) == 1


def test_knee_small_fronts_and_ties() -> None:
    assert knee_index([(0.7, 3.0)]) == 0
    assert knee_index([(0.6, 1.0), (0.9, 5.0)]) == 1        # two points: the more accurate
    assert knee_index([(0.9, 5.0), (0.6, 1.0)]) == 0
    # collinear in normalised space: all distances 0 -> the most accurate
    assert knee_index([(0.1, 1.0), (0.2, 2.0), (0.3, 3.0)]) == 2
    with pytest.raises(ValueError):
        knee_index([])


def test_knee_with_trial_points() -> None:
    front = [tp(10, 0.50, 1.0), tp(11, 0.90, 2.0), tp(12, 0.93, 20.0)]
    assert front[knee_index(front)].number == 11


# ---------------------------------------------------------------- hypervolume

def test_hypervolume_hand_computed() -> None:
    # ref = (acc 0.0, latency 10 ms). Front sorted by latency: (0.5, 1), (0.8, 4), (0.9, 8).
    # Staircase area = (4 - 1) * (0.5 - 0) + (8 - 4) * (0.8 - 0) + (10 - 8) * (0.9 - 0)
    #                = 1.5 + 3.2 + 1.8 = 6.5
    pts = [(0.5, 1.0), (0.8, 4.0), (0.9, 8.0), (0.6, 5.0)]  # (0.6, 5) is dominated by (0.8, 4): adds nothing
    assert hypervolume(pts, (0.0, 10.0)) == pytest.approx(6.5)


def test_hypervolume_reference_clipping() -> None:
    # ref = (acc 0.6, latency 6): (0.5, 1) is below ref accuracy, (0.9, 8) beyond ref latency -> ignored.
    # Only (0.8, 4) counts: (6 - 4) * (0.8 - 0.6) = 0.4
    pts = [(0.5, 1.0), (0.8, 4.0), (0.9, 8.0)]
    assert hypervolume(pts, (0.6, 6.0)) == pytest.approx(0.4)
    assert hypervolume([], (0.0, 1.0)) == 0.0
    assert hypervolume([tp(1, 0.9, 1.0, state="PRUNED")], (0.0, 10.0)) == 0.0
    # duplicates do not double-count: (2 - 1) * 0.5 = 0.5
    assert hypervolume([(0.5, 1.0), (0.5, 1.0)], (0.0, 2.0)) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        hypervolume(pts, (0.0, math.nan))


# ---------------------------------------------------------------- recommend

FRONT = [tp(1, 0.50, 1.0), tp(2, 0.90, 2.0), tp(3, 0.925, 10.0), tp(4, 0.93, 20.0)]


def test_recommend_all_three() -> None:
    r = recommend(FRONT, max_latency_ms=12.0, tolerance_pp=1.0)
    assert set(r) == {"knee", "best_under_latency", "fastest_within_tolerance"}
    assert r["knee"].number == 2
    assert r["best_under_latency"].number == 3           # most accurate with latency <= 12 ms
    # best = 0.93, floor = 0.93 - 1pp = 0.92: trials 3 (0.925) and 4 qualify, trial 2 (0.90) does not
    assert r["fastest_within_tolerance"].number == 3


def test_recommend_none_available() -> None:
    r = recommend(FRONT, max_latency_ms=0.5)            # nothing that fast
    assert r["best_under_latency"] is None
    assert recommend(FRONT)["best_under_latency"] is None  # no budget given
    empty = recommend([])
    assert empty == {"knee": None, "best_under_latency": None, "fastest_within_tolerance": None}
    only_pruned = recommend([tp(1, 0.9, 1.0, state="PRUNED")], max_latency_ms=5.0)
    assert all(v is None for v in only_pruned.values())


def test_recommend_tolerance_edges() -> None:
    r0 = recommend(FRONT, tolerance_pp=0.0)
    assert r0["fastest_within_tolerance"].number == 4     # only the best itself
    r_exact = recommend([tp(1, 0.92, 1.0), tp(2, 0.93, 2.0)], tolerance_pp=1.0)
    assert r_exact["fastest_within_tolerance"].number == 1  # exactly 1 pp below (float-safe)
    r_big = recommend(FRONT, tolerance_pp=50.0)
    assert r_big["fastest_within_tolerance"].number == 1
    with pytest.raises(ValueError, match="tolerance"):
        recommend(FRONT, tolerance_pp=-1.0)
    with pytest.raises(ValueError, match="max latency"):
        recommend(FRONT, max_latency_ms=0.0)


def test_recommend_filters_non_front_points() -> None:
    pts = [*FRONT, tp(9, 0.91, 15.0), tp(8, 0.99, 0.1, state="PRUNED")]
    r = recommend(pts, max_latency_ms=16.0)
    assert r["best_under_latency"].number == 3  # 0.925 @ 10 ms beats the dominated 0.91 @ 15 ms


def test_wilson_interval_and_ties() -> None:
    from autokd.select.pareto import tied, ties, wilson_interval

    lo, hi = wilson_interval(0.9, 360)
    assert lo < 0.9 < hi and hi - lo == pytest.approx(0.0622, abs=2e-3)
    assert wilson_interval(1.0, 50)[1] == 1.0 and wilson_interval(0.0, 50)[0] == 0.0
    a = TrialPoint(1, "COMPLETE", 0.90, 1.0, acc_ci=(0.88, 0.92), latency_ci=(0.98, 1.02))
    b = TrialPoint(2, "COMPLETE", 0.91, 1.01, acc_ci=(0.89, 0.93), latency_ci=(0.99, 1.03))
    c = TrialPoint(3, "COMPLETE", 0.91, 1.2, acc_ci=(0.89, 0.93), latency_ci=(1.15, 1.25))
    assert tied(a, b) and not tied(a, c) and not tied(b, c)  # c: accuracy overlaps, latency does not
    assert ties([a, b, c]) == {1: [2], 2: [1]}
    assert not tied(TrialPoint(4, "COMPLETE", 0.9, 1.0), TrialPoint(5, "COMPLETE", 0.9, 1.01))  # no intervals


def test_knee_is_settled_among_tied_points_by_parameters() -> None:
    # The knee by medians is trial 2; trial 1 is tied with it on both axes and smaller: recommended instead.
    pts = [TrialPoint(0, "COMPLETE", 0.50, 0.5, acc_ci=(0.45, 0.55), latency_ci=(0.49, 0.51)),
           TrialPoint(1, "COMPLETE", 0.89, 0.99, acc_ci=(0.86, 0.92), latency_ci=(0.97, 1.01),
                      param_count=10),
           TrialPoint(2, "COMPLETE", 0.90, 1.0, acc_ci=(0.87, 0.93), latency_ci=(0.98, 1.02),
                      param_count=99),
           TrialPoint(3, "COMPLETE", 0.92, 5.0, acc_ci=(0.90, 0.94), latency_ci=(4.9, 5.1))]
    assert recommend(pts)["knee"].number == 1
    for p in pts:
        p.acc_ci = p.latency_ci = None
    assert recommend(pts)["knee"].number == 2  # without intervals, the plain knee as before

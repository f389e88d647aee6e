from __future__ import annotations

import json
import math

import pytest

from autokd.select.pruning import (
    PruneDecision,
    RungRecord,
    decide,
    decode_rungs,
    encode_rung,
    records_at,
    rung_attr_key,
    rung_epochs,
    should_prune,
)


def rec(trial: int, acc: float, lat: float, epoch: int = 3) -> RungRecord:
    return RungRecord(trial=trial, epoch=epoch, accuracy=acc, latency_ms=lat)


# ---------------------------------------------------------------- rung_epochs

@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((9, 1, 3), [1, 3]),          # the final epoch is never a rung
        ((10, 1, 3), [1, 3, 9]),
        ((27, 2, 3), [2, 6, 18]),
        ((20, 1, 2), [1, 2, 4, 8, 16]),
        ((1, 1, 3), []),
        ((3, 3, 3), []),
        ((4, 3, 3), [3]),
    ],
)
def test_rung_epochs(args: tuple[int, int, int], expected: list[int]) -> None:
    assert rung_epochs(*args) == expected


def test_rung_epochs_defaults() -> None:
    assert rung_epochs(30) == [1, 3, 9, 27]


@pytest.mark.parametrize("kwargs", [{"max_epochs": 0}, {"max_epochs": 9, "min_epoch": 0}, {"max_epochs": 9, "eta": 1}])
def test_rung_epochs_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"pruning (max_epochs|min_epoch|eta)"):
        rung_epochs(**kwargs)


# ---------------------------------------------------------------- should_prune / decide

def test_warm_up_no_pruning_before_min_peers() -> None:
    bad = rec(9, 0.1, 10.0)
    peers = [rec(1, 0.9, 1.0), rec(2, 0.8, 1.0)]  # every peer dominates the candidate ...
    d = decide(bad, peers, eta=3, min_peers=3)    # ... but only 2 peers < min_peers=3
    assert not d.pruned and d.rank == 0 and "warm-up" in d.reason
    # with a third peer the warm-up is over and the dominated candidate goes
    assert should_prune(bad, [*peers, rec(3, 0.7, 1.0)], eta=3, min_peers=3)


def test_dominated_trial_is_pruned_and_front_survives() -> None:
    peers = [rec(1, 0.90, 2.0), rec(2, 0.80, 1.0), rec(3, 0.70, 0.5), rec(4, 0.5, 4.0), rec(5, 0.4, 5.0)]
    # n=6, keep=ceil(6/3)=2; front 1 = {1,2,3} (3 trials) already fills the quota
    dominated = rec(10, 0.60, 3.0)  # dominated by trials 1 and 2
    d = decide(dominated, peers)
    assert d == PruneDecision(pruned=True, rung=3, rank=2, n=6, keep=2, reason=d.reason)
    assert "front 2" in d.reason
    assert not should_prune(rec(11, 0.95, 2.5), peers)  # most accurate: non-dominated


def test_fast_but_inaccurate_trial_on_front_survives() -> None:
    peers = [rec(i, 0.9 + i / 1000, 10.0 + i) for i in range(1, 10)]
    fast = rec(99, 0.15, 0.2)  # terrible accuracy, but nobody is as fast -> first front
    d = decide(fast, peers)
    assert not d.pruned and d.rank == 1


def test_slow_alone_is_never_a_reason() -> None:
    # slowest of all, but the most accurate: non-dominated, so it survives whatever eta
    peers = [rec(i, 0.5, float(i)) for i in range(1, 30)]
    assert not should_prune(rec(100, 0.51, 1000.0), peers, eta=10)


def test_ties_are_never_split() -> None:
    # n=7, keep=ceil(7/3)=3: front 1 holds 2 trials, front 2 holds 4 tied trials (3 peers + candidate).
    # Only one more is needed, but the tie is admitted whole: all 4 continue.
    peers = [rec(1, 0.9, 1.0), rec(2, 0.9, 1.0), rec(3, 0.8, 2.0), rec(4, 0.8, 2.0), rec(5, 0.8, 2.0), rec(8, 0.1, 9.0)]
    cand = rec(6, 0.8, 2.0)
    d = decide(cand, peers)
    assert (d.pruned, d.rank, d.n, d.keep) == (False, 2, 7, 3)
    assert should_prune(rec(8, 0.1, 9.0), [p for p in peers if p.trial != 8] + [cand])  # front 3 goes
    # one more peer on the first front: n=8, keep=3, front 1 already holds 3 -> the whole tie goes
    peers2 = [*peers, rec(7, 0.99, 1.5)]  # trades latency for accuracy with 1 and 2
    d2 = decide(cand, peers2)
    assert (d2.pruned, d2.rank, d2.n, d2.keep) == (True, 2, 8, 3)
    everyone = [*peers2, cand]
    for t in (3, 4, 5, 6):  # every member of the tie gets the same verdict
        me = next(p for p in everyone if p.trial == t)
        assert should_prune(me, [p for p in everyone if p.trial != t])


def test_fronts_admitted_until_quota() -> None:
    # n=10, keep=4: front 1 = {1}, front 2 = {2,3}, front 3 = {cand, 4}: 3 ahead < 4 -> continue
    peers = [rec(1, 0.9, 1.0), rec(2, 0.8, 1.5), rec(3, 0.85, 2.0)]
    peers += [rec(4, 0.7, 3.0)] + [rec(10 + i, 0.1, 50.0 + i) for i in range(5)]
    cand = rec(99, 0.75, 3.5)
    d = decide(cand, peers)
    assert (d.pruned, d.rank, d.n, d.keep) == (False, 3, 10, 4)
    # with eta=4 keep=ceil(10/4)=3 and fronts 1-2 already hold 3 -> pruned
    assert should_prune(cand, peers, eta=4)


def test_peers_from_other_rungs_and_self_ignored() -> None:
    cand = rec(5, 0.3, 5.0, epoch=3)
    # these would all dominate the candidate, but they are at other epochs or are the candidate itself
    noise = [rec(1, 0.9, 1.0, epoch=1), rec(2, 0.9, 1.0, epoch=9), rec(3, 0.9, 1.0, epoch=1), rec(5, 0.99, 0.1, epoch=3)]
    d = decide(cand, noise, min_peers=1)
    assert not d.pruned and "warm-up" in d.reason and d.n == 1
    same = [rec(1, 0.2, 6.0), rec(2, 0.25, 7.0), rec(3, 0.1, 9.0)]
    assert not should_prune(cand, [*noise, *same])  # dominates all same-rung peers


def test_duplicate_records_of_one_peer_count_once() -> None:
    cand = rec(9, 0.5, 5.0)
    dup = [rec(1, 0.9, 1.0)] * 5
    d = decide(cand, dup, min_peers=3)
    assert d.n == 2 and "warm-up" in d.reason


def test_min_peers_zero_and_bad_args() -> None:
    assert not should_prune(rec(1, 0.1, 9.0), [], min_peers=0)  # alone: n=1, keep=1, first front
    with pytest.raises(ValueError, match="eta"):
        should_prune(rec(1, 0.1, 9.0), [], eta=1)
    with pytest.raises(ValueError, match="min_peers"):
        should_prune(rec(1, 0.1, 9.0), [], min_peers=-1)


# ---------------------------------------------------------------- user-attribute encoding

def test_encode_decode_roundtrip_through_json() -> None:
    records = [RungRecord(7, 1, 0.5, 2.5), RungRecord(7, 3, 0.75, 2.5), RungRecord(7, 9, math.nan, 2.5)]
    attrs: dict = {"arch_key": "resnet-abc", "rung_x": {"accuracy": 1.0}, "rung_4": "garbage"}
    for r in records:
        key, value = encode_rung(r)
        attrs[key] = value
    assert rung_attr_key(3) == "rung_3"
    attrs = json.loads(json.dumps(attrs, allow_nan=False))  # plain JSON, no NaN literals
    decoded = decode_rungs(7, attrs)
    assert [r.epoch for r in decoded] == [1, 3, 9]
    assert decoded[:2] == records[:2]
    assert math.isnan(decoded[2].accuracy)


def test_records_at_collects_peers() -> None:
    trials = [
        (0, dict([encode_rung(RungRecord(0, 1, 0.4, 1.0)), encode_rung(RungRecord(0, 3, 0.6, 1.0))])),
        (1, dict([encode_rung(RungRecord(1, 1, 0.5, 2.0))])),
        (2, {}),
        (3, dict([encode_rung(RungRecord(3, 3, 0.7, 3.0))])),
    ]
    assert records_at(3, trials, exclude=3) == [RungRecord(0, 3, 0.6, 1.0)]
    assert {r.trial for r in records_at(1, trials)} == {0, 1}

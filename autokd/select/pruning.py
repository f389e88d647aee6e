"""Pareto-aware successive-halving rung pruner (the MO-ASHA idea), as pure logic over rung records.

Optuna cannot prune multi-objective studies, so autokd does it itself (the rule: :func:`decide`). The module
does no I/O: the caller stores rung records in trial user attributes (:func:`encode_rung`,
:func:`decode_rungs`) so every worker sharing the storage sees them.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from autokd.select.pareto import nondominated_fronts

__all__ = [
    "RUNG_ATTR_PREFIX",
    "PruneDecision",
    "RungRecord",
    "decide",
    "decode_rungs",
    "encode_rung",
    "records_at",
    "rung_attr_key",
    "rung_epochs",
    "should_prune",
]

RUNG_ATTR_PREFIX = "rung_"


@dataclass(frozen=True)
class RungRecord:
    """Validation accuracy of one trial at one rung epoch, with the trial's (architecture) latency."""

    trial: int
    epoch: int
    accuracy: float
    latency_ms: float
    latency_settled: bool = True  # False: the figure was provisional (taken in a slow phase of the host) then


@dataclass(frozen=True)
class PruneDecision:
    """Outcome of one rung comparison, with enough context to log why.

    ``rank`` is the candidate's 1-based front number (1 = non-dominated), 0 during warm-up (not ranked).
    ``n`` counts peers + candidate; ``keep`` is ``ceil(n / eta)``, the minimum number admitted.
    """

    pruned: bool
    rung: int
    rank: int
    n: int
    keep: int
    reason: str


def _check_int(name: str, value: Any, minimum: int, note: str = "") -> None:
    """TypeError unless ``value`` is an int (a bool is not one), ValueError if it is below ``minimum``."""
    message = f"pruning {name} must be an integer >= {minimum}{note}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(message)
    if value < minimum:
        raise ValueError(message)


def _check_eta(eta: int) -> None:
    _check_int("eta", eta, 2, " (the reduction factor per rung)")


def rung_epochs(max_epochs: int, min_epoch: int = 1, eta: int = 3) -> list[int]:
    """Rung epochs ``min_epoch * eta**k`` (k = 0, 1, ...) that are strictly below ``max_epochs``.

    The final epoch is never a rung: a trial that reaches it is complete and its final accuracy enters the
    Pareto front directly, so pruning it there would only throw away a finished result.
    E.g. ``rung_epochs(9) == [1, 3]``, ``rung_epochs(10) == [1, 3, 9]``, ``rung_epochs(1) == []``.
    """
    _check_int("max_epochs", max_epochs, 1)
    _check_int("min_epoch", min_epoch, 1)
    _check_eta(eta)
    rungs: list[int] = []
    epoch = min_epoch
    while epoch < max_epochs:
        rungs.append(epoch)
        epoch *= eta
    return rungs


def _peers_at_rung(candidate: RungRecord, peers: Iterable[RungRecord]) -> list[RungRecord]:
    # Only the same epoch counts, never the candidate itself; if a trial has several records at this epoch
    # (e.g. written twice by a retried worker) the last one wins.
    by_trial: dict[int, RungRecord] = {}
    for p in peers:
        if p.epoch == candidate.epoch and p.trial != candidate.trial:
            by_trial[p.trial] = p
    return list(by_trial.values())


def decide(candidate: RungRecord, peers: Iterable[RungRecord], eta: int = 3, min_peers: int = 3) -> PruneDecision:
    """Decide whether ``candidate`` stops at its rung, given other trials' records (any epochs; filtered here).

    At rung epoch k, the candidate's accuracy@k is compared only with other trials' accuracy at the same epoch
    k. All records at that rung are ranked by non-dominated sorting on (accuracy@k maximize, latency minimize;
    :func:`autokd.pareto.nondominated_fronts`); whole fronts are admitted in order until at least
    ``ceil(n / eta)`` trials are admitted (``n`` = peers + candidate). The candidate continues iff it is
    admitted. Consequences, by construction:

    * ties are never split (a front is admitted whole or not at all);
    * a trial on the first front always survives, so a trial is never pruned for being slow alone, only for
      being dominated (by trials at least as fast and at least as accurate at the same epoch);
    * no pruning at a rung until ``min_peers`` other trials have a record there (warm-up).

    Records from trials in any state count (running, pruned, complete): this is the asynchronous variant,
    where a trial is judged against whoever has reached the rung so far. Peers at other epochs and the
    candidate's own records are ignored.
    """
    _check_eta(eta)
    _check_int("min_peers", min_peers, 0)
    same = _peers_at_rung(candidate, peers)
    n = len(same) + 1
    keep = math.ceil(n / eta)
    if len(same) < min_peers:
        return PruneDecision(
            pruned=False, rung=candidate.epoch, rank=0, n=n, keep=keep,
            reason=f"warm-up: {len(same)} peer(s) at epoch {candidate.epoch} < min_peers={min_peers}; continue",
        )
    records = [candidate, *same]
    fronts = nondominated_fronts([(r.accuracy, r.latency_ms) for r in records])
    admitted = 0
    for rank, front in enumerate(fronts, start=1):
        if 0 in front:  # index 0 is the candidate
            if admitted >= keep:
                return PruneDecision(
                    pruned=True, rung=candidate.epoch, rank=rank, n=n, keep=keep,
                    reason=(f"pruned at epoch {candidate.epoch}: on front {rank} of {len(fronts)}; fronts 1-{rank - 1} "
                            f"already hold {admitted} >= ceil({n}/{eta})={keep} trial(s)"),
                )
            return PruneDecision(
                pruned=False, rung=candidate.epoch, rank=rank, n=n, keep=keep,
                reason=(f"continue at epoch {candidate.epoch}: on front {rank} of {len(fronts)} "
                        f"({admitted} trial(s) ahead, keep ceil({n}/{eta})={keep})"),
            )
        admitted += len(front)
    raise AssertionError("candidate missing from every front")  # unreachable: sorting covers every point


def should_prune(candidate: RungRecord, peers: Iterable[RungRecord], eta: int = 3, min_peers: int = 3) -> bool:
    """True if ``candidate`` should stop at its rung (see :func:`decide` for the reason)."""
    return decide(candidate, peers, eta=eta, min_peers=min_peers).pruned


def rung_attr_key(epoch: int) -> str:
    """User-attribute key under which a trial's record for ``epoch`` is stored, e.g. ``"rung_3"``."""
    return f"{RUNG_ATTR_PREFIX}{int(epoch)}"


def encode_rung(record: RungRecord) -> tuple[str, dict[str, float | None]]:
    """``(key, value)`` to store with ``trial.set_user_attr(key, value)``: ``"rung_<epoch>" -> {"accuracy": ...,
    "latency_ms": ...}``, plain JSON; non-finite numbers become None."""
    def num(x: float) -> float | None:
        x = float(x)
        return x if math.isfinite(x) else None

    return rung_attr_key(record.epoch), {"accuracy": num(record.accuracy), "latency_ms": num(record.latency_ms),
                                         "latency_settled": bool(record.latency_settled)}


def decode_rungs(trial: int, user_attrs: Mapping[str, Any]) -> list[RungRecord]:
    """Rung records of one trial from its user attributes, sorted by epoch.

    Unrelated attributes and malformed entries (storage is shared, so be lenient) are skipped; a None
    accuracy or latency (stored for non-finite values) decodes as NaN, which ranks worst.
    """
    out: list[RungRecord] = []
    for key, value in user_attrs.items():
        if not isinstance(key, str) or not key.startswith(RUNG_ATTR_PREFIX):
            continue
        suffix = key[len(RUNG_ATTR_PREFIX):]
        if not suffix.isdigit() or not isinstance(value, Mapping):
            continue
        acc, lat = value.get("accuracy"), value.get("latency_ms")
        if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in (acc, lat)):
            continue
        out.append(RungRecord(
            trial=int(trial), epoch=int(suffix),
            accuracy=math.nan if acc is None else float(acc),
            latency_ms=math.nan if lat is None else float(lat),
            latency_settled=value.get("latency_settled") is not False,
        ))
    out.sort(key=lambda r: r.epoch)
    return out


def records_at(epoch: int, trials: Iterable[tuple[int, Mapping[str, Any]]], exclude: int | None = None) -> list[RungRecord]:
    """All records at ``epoch`` from ``(trial_number, user_attrs)`` pairs, skipping trial ``exclude``.

    Typical use: ``records_at(k, ((t.number, t.user_attrs) for t in study.get_trials(deepcopy=False)), trial.number)``.
    """
    out: list[RungRecord] = []
    for number, attrs in trials:
        if exclude is not None and number == exclude:
            continue
        out.extend(r for r in decode_rungs(number, attrs) if r.epoch == epoch)
    return out

"""A trial's latency while it lives: measured when it starts, refined while it trains until it is settled.

A measurement is *settled* once enough of its rounds were taken in a fast phase of the host
(:mod:`autokd.latency.hostphase`). A trial does not wait long for one before training: a slow phase can last
many seconds, and the trial's own training time is better spent. So the first measurement waits at most
:data:`FIRST_WAIT_S`; a figure still provisional then is *probed* while the trial trains, every
:data:`PROBE_EVERY_S` seconds between two steps and at each epoch's end: one round when the host is slow (a
fraction of a millisecond), rounds until settled when it is fast, so the figure comes from the fast moments of
the trial's whole life. What is still provisional when a decision that cannot be undone comes (telling the study
a COMPLETE trial's values, calling a trial infeasible) waits up to :data:`FINAL_WAIT_S`, then keeps the rounds
closest to a fast phase. Every figure a decision used is recorded with whether it was settled.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from autokd.latency.meter import LatencyMeter, LatencyResult
    from autokd.latency.pinning import StudyLatency
    from autokd.model.students import StudentSpec

#: Seconds a trial's first measurement may spend in slow phases of the host before training starts.
FIRST_WAIT_S = 0.5
#: Seconds of training between two probes of a provisional figure.
PROBE_EVERY_S = 0.2
#: Seconds a provisional figure may wait before an irreversible decision (the told values, infeasible).
FINAL_WAIT_S = 3.0


class TrialLatency:
    """The latency of one trial's student: ``result`` is the figure now; ``refine`` and ``settle`` improve it
    while it is provisional. ``source`` is the worker's meter (or the study-wide record around it)."""

    def __init__(self, source: LatencyMeter | StudyLatency, spec: StudentSpec) -> None:
        self.source, self.spec = source, spec
        self.result: LatencyResult | None = None
        self.cache_hit = False
        self.refinements = 0  # takes after the first measurement
        self._last_probe = time.monotonic()

    def measure(self, model: nn.Module | None) -> LatencyResult:
        """The first measurement (the cache's or the study's figure when there is one)."""
        self.result, self.cache_hit = self.source.measure(self.spec, model, FIRST_WAIT_S)
        return self.result

    @property
    def settled(self) -> bool:
        """Whether the figure is settled (a cached or recorded figure is)."""
        return self.result is not None and self.result.settled

    def probe(self, every_s: float = PROBE_EVERY_S) -> bool:
        """A probe of a provisional figure, at most one per ``every_s`` seconds (0: now); True when it changed."""
        if self.settled or time.monotonic() - self._last_probe < every_s:
            return False
        changed = self._refine(0.0, probe=True)
        self._last_probe = time.monotonic()
        return changed

    def settle(self) -> bool:
        """Wait up to :data:`FINAL_WAIT_S` for a provisional figure to settle; True when it changed."""
        return self._refine(FINAL_WAIT_S, probe=False)

    def _refine(self, max_wait_s: float, probe: bool) -> bool:
        if self.result is None or self.result.settled:
            return False
        found = self.source.refine(self.spec, max_wait_s, probe)
        if found is None:
            return False
        self.result = found
        self.refinements += 1
        return True

    def close(self) -> None:
        """The trial is over: drop a measurement still pending."""
        self.source.forget(self.spec)


__all__ = ["FINAL_WAIT_S", "FIRST_WAIT_S", "PROBE_EVERY_S", "TrialLatency"]

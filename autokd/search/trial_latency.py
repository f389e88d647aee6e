"""A trial's latency while it lives: measured when it starts, refined while it trains.

A measurement is *settled* once enough of its rounds were taken in a fast phase of the host
(:mod:`autokd.latency.hostphase`). Even then, some students (depthwise convolutions, say) run a few per cent
faster or slower from one second to the next, so a figure from one burst of rounds repeats worse than one from
rounds taken at several moments (docs/performance.md, "Latency inside a search"). And a trial does not wait long for a fast phase before training: a slow
phase can last many seconds, and the trial's training time is better spent. So:

- the first measurement waits at most :data:`FIRST_WAIT_S`;
- while the trial trains, every :data:`PROBE_EVERY_S` seconds between two steps and at each epoch's end, a
  *probe* takes up to :data:`PROBE_ROUNDS` more rounds while the host is fast (one round, a fraction of a
  millisecond, when it is slow), until the figure comes from :data:`MOMENTS` separate moments;
- what is still unsettled when a decision that cannot be undone comes (telling the study a COMPLETE trial's
  values, calling a trial infeasible) waits up to :data:`FINAL_WAIT_S`, then keeps the rounds closest to a fast
  phase.

The figure is the median of all fast rounds so far, relative to the family's anchor timed in the same rounds
(:mod:`autokd.latency.anchors`). Every figure a decision used is recorded with whether it was
settled (rung records: ``latency_settled``; the trial's ``latency``: ``settled``, ``moments``).
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
#: Seconds of training between two probes.
PROBE_EVERY_S = 0.2
#: Fast rounds a probe may add.
PROBE_ROUNDS = 5
#: Separate moments (the first measurement and the probes that found the host fast) a figure is measured at.
MOMENTS = 12
#: Seconds a provisional figure may wait before an irreversible decision (the told values, infeasible).
FINAL_WAIT_S = 10.0


class TrialLatency:
    """The latency of one trial's student: ``result`` is the figure now; :meth:`probe` and :meth:`settle` improve
    it while the trial trains. ``source`` is the worker's meter (or the study-wide record around it)."""

    def __init__(self, source: LatencyMeter | StudyLatency, spec: StudentSpec) -> None:
        self.source, self.spec = source, spec
        self.result: LatencyResult | None = None
        self.cache_hit = False
        self.refinements = 0  # takes after the first measurement
        self._last_probe = time.monotonic()
        self._open = True  # False once the source has nothing more to take (closed, remote, or eager PyTorch)

    def measure(self, model: nn.Module | None) -> LatencyResult:
        """The first measurement (the cache's or the study's figure when there is one)."""
        self.result, self.cache_hit = self.source.measure(self.spec, model, FIRST_WAIT_S)
        return self.result

    @property
    def settled(self) -> bool:
        """Whether the figure is settled (a cached or recorded figure is)."""
        return self.result is not None and self.result.settled

    @property
    def done(self) -> bool:
        """Nothing more to measure: settled, from :data:`MOMENTS` moments (or a cached or recorded figure)."""
        if self.result is None:
            return False
        return self.cache_hit or not self._open or (self.result.settled and self.result.moments >= MOMENTS)

    def probe_due(self, every_s: float = PROBE_EVERY_S) -> bool:
        """Whether a probe is due: not :attr:`done`, and ``every_s`` seconds since the last one (0: now). Checked on
        every training step, so it only reads the clock."""
        return not self.done and time.monotonic() - self._last_probe >= every_s

    def probe(self, every_s: float = PROBE_EVERY_S) -> bool:
        """A probe, when :meth:`probe_due`; True when the figure changed."""
        if not self.probe_due(every_s):
            return False
        changed = self._refine(0.0, probe=PROBE_ROUNDS)
        self._last_probe = time.monotonic()
        return changed

    def settle(self) -> bool:
        """Wait up to :data:`FINAL_WAIT_S` for an unsettled figure to settle; True when it changed."""
        if self.settled:
            return False
        return self._refine(FINAL_WAIT_S, probe=0)

    def _refine(self, max_wait_s: float, probe: int) -> bool:
        if self.result is None or self.cache_hit:
            return False
        found = self.source.refine(self.spec, max_wait_s, probe)
        if found is None:
            self._open = False
            return False
        self.result = found
        self.refinements += 1
        return True

    def close(self) -> None:
        """The trial is over: close its measurement (the source caches or records the final figure)."""
        found = self.source.close(self.spec, None if self.cache_hit else self.result)
        if found is not None:
            self.result = found


__all__ = ["FINAL_WAIT_S", "FIRST_WAIT_S", "MOMENTS", "PROBE_EVERY_S", "PROBE_ROUNDS", "TrialLatency"]

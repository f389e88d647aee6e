"""Anchors: a fixed model of each student family, timed beside every student so its figure is a ratio.

Within the fast phase of a shared host, a student's speed still moves by several per cent from one moment (or one
process) to the next, and by a different amount per family: depthwise convolutions, attention and dense
convolutions each react to the host's state, and to what the trial's training left in the caches, in their own
way (docs/latency.md, "Anchors"). A model of the same family reacts the same way. So a student is timed
interleaved with its family's *anchor* (the family at width and depth :data:`ANCHOR_MULTIPLIER`, same input
shape), and its figure is its ratio to the anchor in those same rounds, times the anchor's own figure from a
*panel* measurement: the anchors of all the search's families timed together, interleaved, once (and cached with the latencies,
so every later search on the same latency cache uses the same panel figures).

This module names the anchors; `autokd.latency.meter` builds, exports, times and caches them (`Anchor`), with the
protocol of `autokd.latency.protocol`.
"""
from __future__ import annotations

from autokd.model.students import StudentSpec, resolve_student

#: Width and depth multiplier of every family's anchor: the middle of the usual ranges.
ANCHOR_MULTIPLIER = 0.5


def anchor_spec(family: str, like: StudentSpec) -> StudentSpec:
    """The anchor of ``family`` for students shaped like ``like`` (classes, channels, input size)."""
    return resolve_student(family, ANCHOR_MULTIPLIER, ANCHOR_MULTIPLIER, like.num_classes, like.in_chans,
                           like.input_size)


def shape_of(spec: StudentSpec) -> tuple[int, int, int]:
    """What an anchor panel is built for: (classes, channels, input size)."""
    return spec.num_classes, spec.in_chans, spec.input_size


__all__ = ["ANCHOR_MULTIPLIER", "anchor_spec", "shape_of"]

"""Cross-process locks on one machine (fcntl), used to keep latency measurements off a busy CPU.

`CpuGate` is a reader-writer lock with a turnstile: workers hold it *shared* while they train and take it
*exclusive* to measure latency, so a measurement never runs while another worker on this machine trains on
the same cores. The turnstile stops a stream of trainers from starving a waiting measurement.

A trainer does not hold the gate for a whole trial: it calls `TrainingHold.pause_point()` after every
optimizer step, and once it has held the gate for `slice_s` it lets a waiting measurement through. Holding it
for a whole trial made a measuring worker sit idle for the rest of another worker's trial, which serialised
`--jobs 2` almost completely.
"""
from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

DEFAULT_SLICE_S = 0.25


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold an flock on `path` (created if missing) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def try_lock(handle: IO[Any]) -> bool:
    """Take an exclusive flock on the open file `handle` without waiting; False if another process holds one.

    The lock lasts until the handle is closed (or the process ends).
    """
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


class TrainingHold:
    """The shared hold of one trainer; `pause_point()` lets a waiting measurement in between two steps."""

    def __init__(self, gate: IO[str], turnstile: IO[str], slice_s: float) -> None:
        self._gate, self._turnstile, self._slice_s = gate, turnstile, slice_s
        self._since = time.monotonic()

    def _enter(self) -> None:
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)  # wait here while a measurement is pending
        fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        fcntl.flock(self._gate, fcntl.LOCK_SH)
        self._since = time.monotonic()

    def _leave(self) -> None:
        fcntl.flock(self._gate, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Leave the gate for the block (a trainer measuring its own student between two epochs), then
        re-enter through the turnstile."""
        self._leave()
        try:
            yield
        finally:
            self._enter()

    def pause_point(self) -> None:
        """Called between training steps: after `slice_s` of holding, leave and re-enter through the turnstile.

        A pending measurement holds the turnstile, so re-entering waits until it is done; with none pending the
        pause costs four flock calls.
        """
        if time.monotonic() - self._since >= self._slice_s:
            self._leave()
            self._enter()


class CpuGate:
    """Shared while training, exclusive while measuring latency (per machine, across processes)."""

    def __init__(self, lock_dir: Path, name: str = "cpu", slice_s: float = DEFAULT_SLICE_S) -> None:
        self._gate = lock_dir / f"{name}.gate.lock"
        self._turnstile = lock_dir / f"{name}.turnstile.lock"
        self._slice_s = slice_s

    @contextlib.contextmanager
    def training(self) -> Iterator[TrainingHold]:
        """Held (shared with other trainers) while a worker trains; yields the hold for its pause points."""
        self._gate.parent.mkdir(parents=True, exist_ok=True)
        with open(self._gate, "a+") as gate, open(self._turnstile, "a+") as turnstile:
            hold = TrainingHold(gate, turnstile, self._slice_s)
            hold._enter()
            try:
                yield hold
            finally:
                hold._leave()

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Held while measuring latency: waits for trainers to leave, keeps new ones out."""
        with file_lock(self._turnstile), file_lock(self._gate):
            yield

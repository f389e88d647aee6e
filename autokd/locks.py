"""Cross-process locks on one machine (fcntl), used to keep latency measurements off a busy CPU.

`CpuGate` is a reader-writer lock with a turnstile: workers hold it *shared* while they train and take it
*exclusive* to measure latency, so a measurement never runs while another worker on this machine trains on
the same cores. The turnstile stops a stream of trainers from starving a waiting measurement.
"""
from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


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


class CpuGate:
    """Shared while training, exclusive while measuring latency (per machine, across processes)."""

    def __init__(self, lock_dir: Path, name: str = "cpu") -> None:
        self._gate = lock_dir / f"{name}.gate.lock"
        self._turnstile = lock_dir / f"{name}.turnstile.lock"

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Held by a worker while it trains (shared with other trainers)."""
        with file_lock(self._turnstile):
            pass  # wait here while a measurement is pending
        with file_lock(self._gate, shared=True):
            yield

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Held while measuring latency: waits for trainers to leave, keeps new ones out."""
        with file_lock(self._turnstile), file_lock(self._gate):
            yield

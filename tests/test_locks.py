"""CpuGate: a latency measurement waits for trainers, but only one time slice, never a whole trial."""
from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

from autokd.utils.locks import CpuGate

SLICE_S = 0.2


def _trainer(lock_dir: str, seconds: float, steps: "mp.Queue[float]", started: "mp.Event") -> None:
    gate = CpuGate(Path(lock_dir), slice_s=SLICE_S)
    with gate.training() as hold:
        started.set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic()
            time.sleep(0.01)  # one "optimizer step"
            steps.put((t0, time.monotonic()))
            hold.pause_point()
    steps.put(None)


def test_measurement_waits_one_slice_and_runs_alone(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    steps, started = ctx.Queue(), ctx.Event()
    trainer = ctx.Process(target=_trainer, args=(str(tmp_path), 3.0, steps, started))
    trainer.start()
    try:
        assert started.wait(10)
        gate = CpuGate(tmp_path, slice_s=SLICE_S)
        asked = time.monotonic()
        with gate.measuring():
            got_in = time.monotonic()
            time.sleep(0.3)  # "measure latency"
            done = time.monotonic()
        trainer.join(20)
        assert trainer.exitcode == 0
        intervals = []
        while (item := steps.get(timeout=5)) is not None:
            intervals.append(item)
    finally:
        if trainer.is_alive():
            trainer.kill()
    # The measurement got in after at most about one slice, long before the 3 s "trial" ended ...
    assert got_in - asked < SLICE_S + 0.5, got_in - asked
    # ... no training step ran while it measured, and training went on afterwards.
    assert not [s for s in intervals if s[0] < done and s[1] > got_in]
    assert any(s[0] >= done for s in intervals)


def test_trainers_share_the_gate(tmp_path: Path) -> None:
    gate = CpuGate(tmp_path, slice_s=0.0)
    with gate.training() as first, gate.training() as second:  # two trainers at once: no deadlock
        first.pause_point()
        second.pause_point()


def _try_lock_in_child(path: str, result: "mp.Queue[bool]") -> None:
    from autokd.utils.locks import try_lock

    with open(path, "a") as handle:
        result.put(try_lock(handle))


def test_try_lock_does_not_wait_and_lasts_until_the_handle_closes(tmp_path: Path) -> None:
    from autokd.utils.locks import try_lock

    ctx = mp.get_context("fork")
    path = tmp_path / "spool.jsonl"
    result: "mp.Queue[bool]" = ctx.Queue()

    def other_process_gets_it() -> bool:
        child = ctx.Process(target=_try_lock_in_child, args=(str(path), result))
        child.start()
        child.join(10)
        return result.get(timeout=10)

    with open(path, "a") as handle:
        assert try_lock(handle)
        assert not other_process_gets_it()
    assert other_process_gets_it()

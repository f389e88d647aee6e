"""CpuGate: a latency measurement waits for trainers, but only one time slice, never a whole trial."""
from __future__ import annotations

import multiprocessing as mp
import queue
import time
from pathlib import Path

import pytest

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


def _sharing_trainer(lock_dir: str, name: str, both_inside: mp.Barrier, steps: mp.Queue[tuple]) -> None:
    gate = CpuGate(Path(lock_dir), slice_s=0.0)  # slice 0: every pause point leaves the gate and enters it again
    with gate.training() as hold:
        # Both trainers inside at the same moment, or the other one could not get in: BrokenBarrierError, exit 1.
        both_inside.wait(20)
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            t0 = time.monotonic()
            time.sleep(0.01)  # one "optimizer step"
            steps.put((name, t0, time.monotonic()))
            hold.pause_point()
    steps.put((name, None, None))


def _two_holds_in_one_process(lock_dir: str) -> None:
    gate = CpuGate(Path(lock_dir), slice_s=0.0)
    with gate.training() as first, gate.training() as second:
        for _ in range(20):
            first.pause_point()
            second.pause_point()


def _finish_within(procs: list[mp.Process], seconds: float, what: str) -> None:
    """Join ``procs``; kill those still running after ``seconds`` and fail the test naming them (a deadlock)."""
    deadline = time.monotonic() + seconds
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [proc for proc in procs if proc.is_alive()]
    for proc in hung:
        proc.kill()
        proc.join(10)
    if hung:
        pytest.fail(f"{what}: {len(hung)} of {len(procs)} process(es) still ran after {seconds:.0f} s: the gate "
                    "deadlocked")


def test_trainers_share_the_gate(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    both_inside, steps = ctx.Barrier(2), ctx.Queue()
    trainers = [ctx.Process(target=_sharing_trainer, args=(str(tmp_path), name, both_inside, steps))
                for name in ("a", "b")]
    for proc in trainers:
        proc.start()
    intervals: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}
    finished: set[str] = set()
    deadline = time.monotonic() + 60
    try:
        while len(finished) < 2:  # read before joining: a child exits only once its queue is flushed
            try:
                name, t0, t1 = steps.get(timeout=0.5)
            except queue.Empty:
                failed = [proc.exitcode for proc in trainers if proc.exitcode not in (None, 0)]
                if failed:
                    pytest.fail(f"a trainer exited with {failed[0]}: it could not get into the gate while the other "
                                "trained (the gate must be shared between trainers)")
                if time.monotonic() > deadline:
                    pytest.fail(f"trainers {sorted(set(intervals) - finished)} did not finish within 60 s: the "
                                "gate deadlocked")
                continue
            if t0 is None:
                finished.add(name)
            else:
                intervals[name].append((t0, t1))
    except BaseException:
        for proc in trainers:
            proc.kill()
        raise
    _finish_within(trainers, 30, "two trainers")
    assert [proc.exitcode for proc in trainers] == [0, 0], "a trainer could not enter while the other trained"
    # Both trained, and at the same time: the gate is shared between trainers (only a measurement is exclusive).
    assert intervals["a"] and intervals["b"]
    assert any(a0 < b1 and b0 < a1 for a0, a1 in intervals["a"] for b0, b1 in intervals["b"])

    # Two holds in one process (nested `training()` blocks) do not deadlock either.
    single = ctx.Process(target=_two_holds_in_one_process, args=(str(tmp_path),))
    single.start()
    _finish_within([single], 30, "two holds in one process")
    assert single.exitcode == 0


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

"""The worker processes of a search on one machine: starting the other workers, waiting for them, their share of
the CPU threads, and SIGTERM.

A spawned worker is `autokd search` run again as worker N: it gets the search's settings themselves (as JSON in
its environment, so a call from Python spawns the same workers as the command line) without the options that
plan this machine's workers, which only the first process acts on.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Iterator, get_type_hints

from autokd.config import SearchSettings
from autokd.errors import Interrupted
from autokd.utils.devices import WorkerSlot

#: The environment variable that hands a spawned worker its settings (read by `autokd search --worker-index N`).
SETTINGS_ENV = "AUTOKD_WORKER_SETTINGS"


def settings_to_json(s: SearchSettings) -> str:
    """``s`` as a JSON object (paths as strings)."""
    return json.dumps(dataclasses.asdict(s), default=str)


def settings_from_json(text: str) -> SearchSettings:
    """Inverse of `settings_to_json`."""
    values = json.loads(text)
    hints = get_type_hints(SearchSettings)
    return SearchSettings(**{k: Path(v) if hints[k] is Path and v is not None else v for k, v in values.items()})


def worker_settings(s: SearchSettings, total: int) -> SearchSettings:
    """The settings of a spawned worker: the search's, as one job of ``total`` (its share of the CPU threads),
    without the options that plan this machine's workers."""
    return dataclasses.replace(s, jobs=total, devices=None, jobs_per_device=1)


def spawn_workers(s: SearchSettings, slots: list[WorkerSlot], total: int) -> list[subprocess.Popen]:
    """Start worker ``slot.index`` of ``total`` for each slot (on GPUs with ``CUDA_VISIBLE_DEVICES`` set to its
    device). They join the study the first process created: the teacher, its outputs cache and the parent run
    are already there, so they only load them."""
    env = {**os.environ, SETTINGS_ENV: settings_to_json(worker_settings(s, total))}
    return [subprocess.Popen([sys.executable, "-m", "autokd.cli", "search", "--worker-index", str(slot.index)],
                             env={**env, **slot.env}) for slot in slots]


def wait_worker(proc: subprocess.Popen) -> None:
    """Wait for a spawned worker; interrupted meanwhile, stop it first (SIGTERM, then up to 30 s)."""
    try:
        proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait(timeout=30)
        raise


def train_threads(jobs: int) -> int:
    """Torch CPU threads per worker: an explicit OMP_NUM_THREADS wins, else the cores split over the jobs."""
    # Overriding a user's OMP_NUM_THREADS oversubscribes shared machines: tiny models then run many times slower.
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


# SIGTERM raises `Interrupted` wherever the main thread is, so a worker stops promptly whatever it waits for,
# except inside a storage or tracking call, which the exception would leave half-done (in Optuna's journal lock:
# a lock file left behind, every worker stalled for its grace period): the signal is re-sent once it returns.
# No plainer mechanism serves: a flag checked at safe points leaves the long waits (teacher, latency, locks)
# deaf to SIGTERM, and pthread_sigmask blocks it in one thread while the kernel hands it to any other.
STORAGE_MODULES = ("optuna.storages", "sqlalchemy", "mlflow.store")
_MAX_DEFER_S = 5.0


def in_storage_call(frame: FrameType | None) -> bool:
    """Whether ``frame`` or a caller of it runs code of a storage or tracking store (`STORAGE_MODULES`)."""
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        if any(module == name or module.startswith(name + ".") for name in STORAGE_MODULES):
            return True
        frame = frame.f_back
    return False


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While inside, SIGTERM raises `Interrupted` in the main thread (outside storage calls, see above).

    Does nothing where signal handlers cannot be set (a thread other than the main one).
    """
    first: list[float] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        first.append(time.monotonic())
        if in_storage_call(frame) and time.monotonic() - first[0] < _MAX_DEFER_S:
            # Deliver the signal again in a moment, once the storage call has returned.
            threading.Timer(0.02, os.kill, (os.getpid(), signum)).start()
            return
        raise Interrupted(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if previous is not None:  # None: the handler before was not set from Python and cannot be put back
            signal.signal(signal.SIGTERM, previous)

"""The worker processes of a search: the settings a spawned worker gets, and SIGTERM around storage calls."""
from __future__ import annotations

import inspect
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from autokd.config import SearchSettings
from autokd.errors import Interrupted
from autokd.search import processes
from autokd.search.processes import (
    SETTINGS_ENV,
    in_storage_call,
    settings_from_json,
    settings_to_json,
    sigterm_interrupts,
    worker_settings,
)
from autokd.utils.devices import CUDA_ENV, WorkerSlot


def test_settings_travel_as_json() -> None:
    s = SearchSettings(budget=9, space=Path("spaces/x.yaml"), root=Path("/tmp/r"), compile="max-autotune",
                       latency_token="t", max_latency_ms=2.5, devices="0,1")
    back = settings_from_json(settings_to_json(s))
    assert back == s
    assert isinstance(back.space, Path) and isinstance(back.root, Path)


def test_spawned_workers_get_the_settings_without_the_planning_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker N of M runs `autokd search --worker-index N` with the search's settings as one job of M: the options
    that plan this machine's workers (--jobs, --devices, --jobs-per-device) are the first process's alone."""
    started: list[tuple[list[str], dict[str, str]]] = []

    def popen(cmd: list[str], env: dict[str, str]) -> Any:
        started.append((cmd, env))
        return None

    monkeypatch.setattr(processes.subprocess, "Popen", popen)
    s = SearchSettings(devices="0,1", jobs_per_device=2, device="cuda", budget=9, root=Path("r"))
    slot = WorkerSlot(index=3, device_index=1, env={CUDA_ENV: "1"})
    processes.spawn_workers(s, [slot], total=4)
    [(cmd, env)] = started
    assert cmd == [sys.executable, "-m", "autokd.cli", "search", "--worker-index", "3"]
    assert env[CUDA_ENV] == "1"
    spawned = settings_from_json(env[SETTINGS_ENV])
    assert spawned == worker_settings(s, 4)
    assert (spawned.jobs, spawned.devices, spawned.jobs_per_device) == (4, None, 1)
    assert (spawned.device, spawned.budget, spawned.root) == ("cuda", 9, Path("r"))


def _frame_of(module: str) -> FrameType:
    namespace: dict[str, Any] = {"__name__": module, "inspect": inspect}
    exec("def here():\n    return inspect.currentframe()\n", namespace)  # noqa: S102 - a frame of that module
    return namespace["here"]()


@pytest.mark.parametrize(("module", "inside"), [
    ("optuna.storages.journal._file", True), ("optuna.storages", True), ("sqlalchemy.engine.base", True),
    ("mlflow.store.tracking.sqlalchemy_store", True), ("optuna.trial._trial", False),
    ("optuna.storagesx", False), ("mlflow.tracking.client", False), ("autokd.study", False),
])
def test_storage_calls_are_recognised_by_module(module: str, inside: bool) -> None:
    assert in_storage_call(_frame_of(module)) is inside
    assert in_storage_call(inspect.currentframe()) is False
    assert in_storage_call(None) is False


def test_sigterm_waits_for_a_storage_call_to_return() -> None:
    """SIGTERM during a storage call: the call completes, then `Interrupted` is raised after it returns."""
    namespace: dict[str, Any] = {"__name__": "optuna.storages.fake", "os": os, "signal": signal, "time": time}
    exec("def append():\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(0.3)\n    return 'written'\n",
         namespace)  # noqa: S102 - code that runs as a storage module
    returned: list[str] = []
    before = signal.getsignal(signal.SIGTERM)
    t0 = time.monotonic()
    with pytest.raises(Interrupted, match="signal 15"):
        with sigterm_interrupts():
            returned.append(namespace["append"]())
            time.sleep(10)
    assert returned == ["written"]
    assert time.monotonic() - t0 < 5
    assert signal.getsignal(signal.SIGTERM) == before  # the handler before is back


def test_sigterm_elsewhere_interrupts_at_once() -> None:
    t0 = time.monotonic()
    with pytest.raises(Interrupted):
        with sigterm_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
    assert time.monotonic() - t0 < 5

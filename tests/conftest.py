"""Shared pytest fixtures."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _session_cwd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Session fixtures (a teacher, an MLflow server) start in a temporary directory, never the repository's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("session_cwd"))
        yield


@pytest.fixture(autouse=True)
def _own_cwd(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own fresh, empty working directory (not its tmp_path, which tests list).

    A test must not see what an earlier command left where pytest was started (studies/, mlruns/, student/),
    nor leave anything there: files of the repository are found through REPO_ROOT.
    """
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def repo_pythonpath() -> str:
    """PYTHONPATH for a subprocess that must import this checkout's autokd: the repository first, then whatever
    the caller's PYTHONPATH already holds (packages installed to a folder, as on the GPU check machine)."""
    return os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))


#: The type of the ``logged`` fixture.
Logged = Callable[[], list[str]]


@pytest.fixture()
def logged(caplog: pytest.LogCaptureFixture) -> Logged:
    """The messages autokd logged so far in the test (its ``autokd.*`` loggers, INFO and up), in order."""
    caplog.set_level(logging.INFO, logger="autokd")
    return lambda: [r.getMessage() for r in caplog.records if r.name.split(".")[0] == "autokd"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mlflow_cli() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (SQLite backend, proxied artifacts) on a free loopback port; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    cmd = _mlflow_cli() + [
        "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]
    with open(log_path, "wb") as log:
        # own session: the server forks uvicorn workers, and the whole group must go at teardown
        # The server's background job runners (huey consumers, ~10 processes) are not needed for tracking and
        # would take most of a 2-core machine while the tests run.
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
                                env=env)
    try:
        deadline = time.monotonic() + 180  # cold start takes ~10-45 s on a busy 2-core machine
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer within 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # stragglers of the group (uvicorn workers) once the parent is gone
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A small real teacher (timm test_resnet, 8 epochs on a digits subset), trained once per test session.

    Returns (timm arch, checkpoint path) for --teacher / --teacher-checkpoint: the default digits teacher
    would cost the suite most of a minute to train.
    """
    from autokd.model.data import load_dataset
    from autokd.model.teacher import TeacherRecipe, get_teacher

    data = load_dataset("digits", input_size=16, train_limit=160)
    teacher = get_teacher(data, arch="test_resnet", cache_root=tmp_path_factory.mktemp("teacher"),
                          recipe=TeacherRecipe(epochs=8, batch_size=32, lr=1e-2))
    assert teacher.val_acc > 0.8  # a teacher worth distilling from
    assert teacher.path is not None
    return teacher.arch, teacher.path


def mlflow_rest(uri: str, endpoint: str, body: dict | None = None, query: dict | None = None) -> dict:
    """Call MLflow's REST API (GET, or POST with a JSON body) and return the decoded answer."""
    import json
    import urllib.parse

    url = f"{uri}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


def split_runs(runs: list) -> tuple[list, dict[int, object]]:
    """(parent runs, trial number -> child run) of a study's MLflow runs; two runs for one trial fail the test."""
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children: dict[int, object] = {}
    for r in runs:
        if "mlflow.parentRunId" in r.data.tags:
            number = int(r.data.tags["autokd.trial"])
            assert number not in children, f"two runs for trial {number}"
            children[number] = r
    return parents, children


@pytest.fixture()
def timed_onnx(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every ONNX model (bytes or path) handed to ONNX Runtime for timing, in order (a spy on make_session)."""
    from autokd.latency import protocol as ort_timing

    timed: list = []
    real = ort_timing.make_session

    def spy(onnx, *args, **kwargs):  # type: ignore[no-untyped-def]
        timed.append(onnx)
        return real(onnx, *args, **kwargs)

    monkeypatch.setattr(ort_timing, "make_session", spy)
    return timed

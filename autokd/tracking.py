"""MLflow tracking: one parent run per study, one nested child run per trial; a no-op tracker when disabled.

Layout. One MLflow experiment per study (``experiment_name``). The parent run is named after the study and
carries the study's settings; every trial gets a child run ``trial-<n>`` nested under it through the
``mlflow.parentRunId`` tag. Tags: ``autokd.study``, ``autokd.role`` (``parent``/``trial``),
``autokd.trial``, and on terminal children ``autokd.state`` (the autokd trial state) plus
``autokd.fail_reason`` where there is one. Everything goes through an explicit ``MlflowClient``: no global
``mlflow.start_run`` state, so several trials and worker processes can log side by side.

Parent run status policy. The parent is a container, not a process: it is created and immediately marked
FINISHED, and afterwards only logged to (params, tags, report artifacts; MLflow accepts those on a finished
run). So a killed worker (``kill -9``) can never leave the parent RUNNING, and there is nothing to hand over
between workers that start and stop independently. ``end_parent`` just (re)sets the terminal status and end
time, e.g. at the end of each search invocation so the UI's duration covers the latest one. A child run is
RUNNING exactly while its trial runs; children orphaned by a dead worker are closed by ``close_stale_runs``.

Local default store. ``default_tracking_uri`` is a SQLite database, ``<studies_root>/mlflow.db``, shared by
all studies, with artifacts under ``<studies_root>/mlartifacts/<experiment>``. Why not the ``file:`` store:
in MLflow 3.x it is in maintenance mode and, from 3.17 (installed here: 3.17.2), constructing it raises
unless ``MLFLOW_ALLOW_FILE_STORE=true`` is set; its experiment creation is also not atomic between
processes. SQLite serialises writers itself (MLflow sets ``busy_timeout`` 20 s on every session); two worker
processes each logging hundreds of batches concurrently produced no "database is locked" errors. What did
break was the *first* use of a fresh database: two processes both ran MLflow's schema migrations and one
failed with "duplicate column name". We therefore open a SQLite store for the first time under an
exclusive file lock (``<db>.lock``), after which concurrent use is safe. Past one machine, point
``--tracking-uri`` at an MLflow tracking server.

Failures. A store that cannot be reached or used at startup raises ``UserError`` naming the URI. Mid-search
errors (a network hiccup, a busy database) never fail a trial: each call is retried once, then a warning is
logged and the search goes on. For HTTP stores we lower MLflow's own HTTP retry budget (default ~4 minutes
per call) to a few seconds unless the user set ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``/``..._TIMEOUT``.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from autokd.errors import UserError

logger = logging.getLogger(__name__)

TERMINAL_STATUS: dict[str, str] = {
    "COMPLETE": "FINISHED",
    "PRUNED": "FINISHED",
    "INFEASIBLE": "FINISHED",
    "FAIL": "FAILED",
    "INTERRUPTED": "KILLED",
}

PARENT_RUN_TAG = "mlflow.parentRunId"
ROLE_TAG = "autokd.role"
STUDY_TAG = "autokd.study"
TRIAL_TAG = "autokd.trial"
STATE_TAG = "autokd.state"
FAIL_REASON_TAG = "autokd.fail_reason"

# MLflow's limits (mlflow.utils.validation); repeated here so this module imports mlflow lazily.
_MAX_PARAM_VAL_LENGTH = 6000
_MAX_TAG_VAL_LENGTH = 8000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000

# Error codes that will not go away on retry.
_PERMANENT_ERRORS = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED",
})

_HTTP_SCHEMES = ("http://", "https://")
_T = TypeVar("_T")


def default_tracking_uri(studies_root: Path) -> str:
    """The local MLflow store shared by all studies under ``studies_root`` (a SQLite database)."""
    return "sqlite:///" + str((Path(studies_root) / "mlflow.db").resolve())


def _sqlite_path(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def _is_http(tracking_uri: str) -> bool:
    return tracking_uri.startswith(_HTTP_SCHEMES)


def ui_command(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """Command line that serves the MLflow UI for a local store (``autokd ui`` runs it)."""
    if _is_http(tracking_uri):
        raise UserError(
            f"MLflow tracking URI {tracking_uri!r} is already a tracking server: open it in a browser "
            "instead of starting a UI (autokd ui serves local stores such as sqlite:///studies/mlflow.db).")
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(port), "--workers", "1"]


def _truncate(value: object, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _chunks(items: list[_T], size: int) -> Iterator[list[_T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _safe_dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock; the race only matters on a fresh database
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------------
# No-op base classes (used with --no-mlflow)
# ----------------------------------------------------------------------------------------------------------

class TrialRun:
    """The child run of one trial. This base class is the no-op run: every method does nothing."""

    run_id: str = ""

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Log one epoch's metrics at ``step=epoch`` (a single batch call)."""

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Log step-less metrics (final values) in a single batch call."""

    def log_params(self, params: dict[str, object]) -> None:
        """Log params; values are ``str()``-ed and truncated to MLflow's limit."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set tags on the run."""

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        """Upload every file under ``local_dir``."""

    def flush(self) -> None:
        """Wait until everything logged so far is in the store (an interrupted run's ``end`` does this)."""

    def end(self, state: str, reason: str | None = None) -> None:
        """End the run with the MLflow status for autokd ``state`` (see TERMINAL_STATUS); idempotent."""


class Tracker:
    """Study-level tracking. This base class is the no-op tracker used with ``--no-mlflow``."""

    enabled: bool = False
    tracking_uri: str | None = None

    def __init__(self, experiment_name: str = "") -> None:
        self.experiment_name = experiment_name

    def create_parent_run(self, study_name: str, tags: dict[str, str], params: dict[str, object]) -> str | None:
        """Create the study's parent run and return its id (None when tracking is off)."""
        return None

    def parent_run_exists(self, run_id: str) -> bool:
        """Whether ``run_id`` is a live (not deleted) run of this study's experiment."""
        return False

    def start_trial(self, parent_run_id: str | None, trial_number: int, params: dict[str, object],
                    tags: dict[str, str]) -> TrialRun:
        """Create the RUNNING child run of trial ``trial_number``."""
        return TrialRun()

    def close_stale_runs(self, parent_run_id: str | None, trial_states: dict[int, str]) -> int:
        """End children still RUNNING whose trial no longer runs; returns how many were closed."""
        return 0

    def log_parent_artifacts(self, parent_run_id: str, files: list[Path], artifact_path: str = "report") -> None:
        """Upload report files to the parent run."""

    def end_parent(self, parent_run_id: str, status: str = "FINISHED") -> None:
        """(Re)set the parent's terminal status and end time."""

    def flush(self) -> None:
        """Wait until every trial run's queued MLflow calls are in the store (runs end without waiting)."""


# ----------------------------------------------------------------------------------------------------------
# MLflow implementation
# ----------------------------------------------------------------------------------------------------------

def _attempt(what: str, fn: Callable[..., _T], *args: Any, attempts: int = 2, delay: float = 1.0,
             **kwargs: Any) -> tuple[bool, _T | None]:
    """Run one MLflow call; retry transient errors, then warn instead of raising. Returns (ok, result)."""
    for attempt in range(1, attempts + 1):
        try:
            return True, fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never kill a trial
            if _error_code(exc) in _PERMANENT_ERRORS or attempt == attempts:
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                logger.warning("MLflow: %s failed (%s: %s); continuing without it", what, type(exc).__name__, first)
                return False, None
            time.sleep(delay * attempt)
    return False, None


def _call(what: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T | None:
    """``_attempt`` for callers that only need the result (None on failure)."""
    return _attempt(what, fn, *args, **kwargs)[1]


class _CallQueue:
    """Runs MLflow calls in order on one daemon thread, so per-epoch logging does not stall training.

    A SQLite or HTTP round trip costs ~10 ms per call, and a trial makes about ten of them; run in line they
    were half of a default search's bookkeeping. ``end()`` does not wait for them (except for an interrupted
    trial); the search drains the queue with ``Tracker.flush()`` before it returns or exits, so after a search
    everything is in the store, and a process that exits normally drains it too (an ``atexit`` hook: daemon
    threads still run while those hooks do). A ``kill -9`` loses what was still queued (a few calls at most);
    its runs are closed on the next start anyway. Calls go through ``_call``, which never raises.
    """

    def __init__(self) -> None:
        self._pending: deque[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = deque()
        self._unfinished = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        atexit.register(self._drain_at_exit)

    def _drain_at_exit(self) -> None:
        if not self.drain(timeout=60.0):
            logger.warning("MLflow: calls still queued at exit after 60 s; they are lost")

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue ``fn(*args, **kwargs)`` behind the calls submitted before it."""
        with self._cond:
            self._pending.append((fn, args, kwargs))
            self._unfinished += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="autokd-mlflow", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                fn, args, kwargs = self._pending.popleft()
            try:
                fn(*args, **kwargs)
            except BaseException:  # noqa: BLE001 - keep the writer alive; _call already warns on errors
                logger.exception("MLflow: a queued call failed")
            finally:
                with self._cond:
                    self._unfinished -= 1
                    self._cond.notify_all()

    def drain(self, timeout: float = 300.0) -> bool:
        """Wait until every submitted call has run; False if ``timeout`` seconds passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._unfinished:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
        return True


def _metric_list(metrics: dict[str, float], step: int, what: str) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    out = []
    for key, value in metrics.items():
        try:
            out.append(Metric(key=str(key), value=float(value), timestamp=now, step=int(step)))
        except (TypeError, ValueError):
            logger.warning("MLflow: %s: metric %r has non-numeric value %r; skipped", what, key, value)
    return out


class MlflowTrialRun(TrialRun):
    """A child run in MLflow; every call is retried once, then only warns.

    With ``calls``, they run in the background on that queue, in order (``flush`` waits for them); without,
    every call runs in line. ``create`` (a function returning the new run's id, or None if it could not be
    created) is queued first: the run is created in the background too, and each call reads the id when it
    runs. If creation failed, the run's calls are skipped (the failure was already warned about).
    """

    def __init__(self, client: Any, run_id: str | None = None, calls: _CallQueue | None = None,
                 create: Callable[[], str | None] | None = None) -> None:
        self._client = client
        self._run_id = run_id
        self._ended = False
        self._calls = calls
        self._creating = create is not None
        if create is not None:
            self._run_later(lambda: self._created(create()))

    def _created(self, run_id: str | None) -> None:
        self._run_id = run_id
        self._creating = False

    @property
    def run_id(self) -> str:
        """The MLflow run id ("" if the run could not be created); waits for a creation still queued."""
        if self._creating:
            self.flush()
        return self._run_id or ""

    def _run_later(self, fn: Callable[[], Any]) -> None:
        if self._calls is None:
            fn()
        else:
            self._calls.submit(fn)

    def _submit(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``fn(run_id, *args, **kwargs)`` (in the background with a queue) through ``_call``."""
        def call() -> None:
            if self._run_id:
                _call(f"{what} (run {self._run_id})", fn, self._run_id, *args, **kwargs)

        self._run_later(call)

    def _log_batch(self, what: str, metrics: list[Any] = (), params: list[Any] = (), tags: list[Any] = ()) -> None:
        self._submit(what, self._client.log_batch, metrics=list(metrics), params=list(params), tags=list(tags))

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        items = _metric_list(metrics, epoch, "log_epoch")
        for chunk in _chunks(items, _MAX_METRICS_PER_BATCH):
            self._log_batch(f"log_epoch {epoch}", metrics=chunk)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        items = _metric_list(metrics, 0, "log_metrics")
        for chunk in _chunks(items, _MAX_METRICS_PER_BATCH):
            self._log_batch("log_metrics", metrics=chunk)

    def log_params(self, params: dict[str, object]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _truncate(v, _MAX_PARAM_VAL_LENGTH)) for k, v in params.items()]
        for chunk in _chunks(items, _MAX_PARAMS_TAGS_PER_BATCH):
            self._log_batch("log_params", params=chunk)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), _truncate(v, _MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for chunk in _chunks(items, _MAX_PARAMS_TAGS_PER_BATCH):
            self._log_batch("set_tags", tags=chunk)

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        self._submit(f"log_artifacts {local_dir}", self._client.log_artifacts, str(local_dir), artifact_path)

    def flush(self) -> None:
        if self._calls is not None and not self._calls.drain():
            logger.warning("MLflow: run %s still has calls queued after 300 s; going on", self._run_id)

    def end(self, state: str, reason: str | None = None) -> None:
        if state not in TERMINAL_STATUS:
            raise ValueError(f"unknown terminal trial state {state!r}; expected one of {sorted(TERMINAL_STATUS)}")
        if self._ended:
            return
        self._ended = True
        tags = {STATE_TAG: state}
        if reason:
            tags[FAIL_REASON_TAG] = reason
        self.set_tags(tags)
        self._submit(f"end run as {TERMINAL_STATUS[state]}", self._client.set_terminated, TERMINAL_STATUS[state])
        if state == "INTERRUPTED":
            self.flush()  # the process is about to exit: the KILLED status must be in the store first


class MlflowTracker(Tracker):
    """Tracker writing to an MLflow store through an explicit ``MlflowClient``."""

    enabled = True

    def __init__(self, client: Any, tracking_uri: str, experiment_name: str, experiment_id: str) -> None:
        super().__init__(experiment_name)
        self._client = client
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.study_name = experiment_name
        self._calls = _CallQueue()  # one background writer for all trial runs of this worker

    def flush(self) -> None:
        if not self._calls.drain():
            logger.warning("MLflow: trial runs still have calls queued after 300 s; going on")

    def create_parent_run(self, study_name: str, tags: dict[str, str], params: dict[str, object]) -> str | None:
        self.study_name = study_name
        all_tags = {str(k): _truncate(v, _MAX_TAG_VAL_LENGTH) for k, v in tags.items()}
        all_tags.update({STUDY_TAG: study_name, ROLE_TAG: "parent"})
        run = _call("create parent run", self._client.create_run, self.experiment_id,
                    run_name=study_name, tags=all_tags)
        if run is None:
            return None
        run_id = run.info.run_id
        MlflowTrialRun(self._client, run_id).log_params(params)
        self.end_parent(run_id)  # a container, never left RUNNING (module docstring)
        return run_id

    def parent_run_exists(self, run_id: str) -> bool:
        if not run_id:
            return False
        try:
            run = self._client.get_run(run_id)
        except Exception as exc:  # noqa: BLE001
            if _error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return False
            # Unknown because the store hiccuped: claim it exists rather than start a duplicate parent.
            logger.warning("MLflow: could not look up parent run %s (%s); assuming it exists", run_id, exc)
            return True
        return run.info.lifecycle_stage == "active" and run.info.experiment_id == self.experiment_id

    def start_trial(self, parent_run_id: str | None, trial_number: int, params: dict[str, object],
                    tags: dict[str, str]) -> TrialRun:
        all_tags = {str(k): _truncate(v, _MAX_TAG_VAL_LENGTH) for k, v in tags.items()}
        all_tags.update({STUDY_TAG: self.study_name, ROLE_TAG: "trial", TRIAL_TAG: str(trial_number)})
        if parent_run_id:
            all_tags[PARENT_RUN_TAG] = parent_run_id

        def create() -> str | None:
            run = _call(f"create run for trial {trial_number}", self._client.create_run, self.experiment_id,
                        run_name=f"trial-{trial_number}", tags=all_tags)
            return None if run is None else run.info.run_id

        # Created on the background writer like the run's other calls: a synchronous create_run was most of
        # what MLflow still cost a trial (~10 ms a SQLite round trip).
        trial_run = MlflowTrialRun(self._client, calls=self._calls, create=create)
        trial_run.log_params(params)
        return trial_run

    def _running_children(self, parent_run_id: str) -> list[Any]:
        runs: list[Any] = []
        token = None
        while True:
            page = self._client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
                max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def close_stale_runs(self, parent_run_id: str | None, trial_states: dict[int, str]) -> int:
        """End children still RUNNING whose trial no longer runs; returns how many were closed.

        ``trial_states`` maps trial number to autokd state. RUNNING children of RUNNING trials are left alone;
        a trial that is FAIL while its run was never ended died with its worker, so its run becomes KILLED;
        a trial missing from ``trial_states`` is unknown to the study and its run is KILLED too.
        """
        if not parent_run_id:
            return 0
        self.flush()  # our own runs' end calls may still be queued: they are not stale
        children = _call(f"search running children of {parent_run_id}", self._running_children, parent_run_id)
        closed = 0
        for run in children or []:
            raw = run.data.tags.get(TRIAL_TAG)
            number = int(raw) if raw is not None and raw.lstrip("-").isdigit() else None
            state = trial_states.get(number) if number is not None else None
            if state == "RUNNING":
                continue
            if state == "FAIL":
                status, reason = "KILLED", "worker died while the trial was running (stale trial)"
            elif state in TERMINAL_STATUS:
                status, reason = TERMINAL_STATUS[state], None
            else:
                status, reason = "KILLED", f"trial {raw} is unknown to the study"
            tags = {STATE_TAG: state or "UNKNOWN"}
            if reason:
                tags[FAIL_REASON_TAG] = reason
            child = MlflowTrialRun(self._client, run.info.run_id)
            child.set_tags(tags)
            ok, _ = _attempt(f"close stale run {run.info.run_id}", self._client.set_terminated,
                             run.info.run_id, status)
            closed += int(ok)
        return closed

    def log_parent_artifacts(self, parent_run_id: str, files: list[Path], artifact_path: str = "report") -> None:
        for path in files:
            _call(f"log artifact {path} to parent {parent_run_id}", self._client.log_artifact,
                  parent_run_id, str(path), artifact_path)

    def end_parent(self, parent_run_id: str, status: str = "FINISHED") -> None:
        if parent_run_id:
            _call(f"end parent run {parent_run_id}", self._client.set_terminated, parent_run_id, status)


def _check_reachable(tracking_uri: str) -> None:
    """Fail fast (seconds, not MLflow's minutes of retries) when an HTTP tracking server is down."""
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=10):
            pass
    except urllib.error.HTTPError:
        pass  # it answered: a proxy or a server without /health; the real calls below decide
    except (urllib.error.URLError, OSError, socket.timeout) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"MLflow tracking server {tracking_uri!r} is not reachable ({reason}). Start it (e.g. "
            f"`mlflow server --host 127.0.0.1 --port 5000`), pass the right --tracking-uri, "
            f"or run with --no-mlflow.") from exc


def _get_or_create_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(exc).lower():
                raise
            experiment = client.get_experiment_by_name(name)  # another worker created it just now
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def limit_http_retries(uri: str | None) -> None:
    """For an HTTP tracking server, fail in seconds rather than MLflow's ~4 minutes of retries per call, unless
    the user chose their own ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT``."""
    if uri and _is_http(uri):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def make_tracker(tracking_uri: str | None, enabled: bool, studies_root: Path, experiment_name: str) -> Tracker:
    """The study's tracker: a no-op when disabled, else MLflow at ``tracking_uri`` (local default if None).

    Raises UserError when the store cannot be reached or used.
    """
    if not enabled:
        return Tracker(experiment_name)
    studies_root = Path(studies_root)
    uri = tracking_uri or default_tracking_uri(studies_root)
    artifact_location = None
    if _is_http(uri):
        limit_http_retries(uri)
        # MlflowClient.set_terminated on an HTTP store prints two "View run/experiment at" lines per run (one
        # extra get_run round trip each): 100 lines of noise between the progress lines of a 50-trial search.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        _check_reachable(uri)
    elif not uri.startswith("databricks"):
        # Database stores write artifacts client-side; keep them with the studies, not in the cwd's ./mlruns.
        artifact_location = (studies_root / "mlartifacts" / _safe_dirname(experiment_name)).resolve().as_uri()

    from mlflow.tracking import MlflowClient

    db_path = _sqlite_path(uri)
    lock = _file_lock(db_path.with_name(db_path.name + ".lock")) if db_path else contextlib.nullcontext()
    try:
        with lock:  # first use of a fresh SQLite file runs migrations; two processes at once would collide
            client = MlflowClient(tracking_uri=uri)
            experiment_id = _get_or_create_experiment(client, experiment_name, artifact_location)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to reach/use the store is a setup problem
        first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
        hint = ("start the tracking server" if _is_http(uri)
                else "check the URI (local default: sqlite:///<studies>/mlflow.db)")
        raise UserError(f"cannot use MLflow tracking URI {uri!r}: {first}. Fix it ({hint}), pass another "
                        f"--tracking-uri, or run with --no-mlflow.") from exc
    return MlflowTracker(client, uri, experiment_name, experiment_id)

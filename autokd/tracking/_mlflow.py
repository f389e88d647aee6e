"""The MLflow implementation of the tracking interface (use it through `autokd.tracking`).

One experiment per study; the study's parent run and one child run per trial (``trial-<n>``, nested through the
``mlflow.parentRunId`` tag; tags ``autokd.study``, ``autokd.role``, ``autokd.trial``, ``autokd.state``,
``autokd.fail_reason``), all through an explicit ``MlflowClient``, never the global ``mlflow.start_run`` state.
A store that cannot be used at start is a UserError; later errors never fail a trial: trial calls go out in
order on a background thread and, while the store does not answer, wait in an on-disk spool to be replayed
(``_Sender``). MLflow is imported lazily: the first call pays for it.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, deque
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from autokd.errors import UserError
from autokd.tracking.base import MLFLOW_STATUS, ArtifactReader, Tracker, TrialRun
from autokd.utils.appendonly import append_line
from autokd.utils.atomic import atomic_write_text

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)  # under "autokd.tracking", the name users' settings (and the tests) filter on

PARENT_RUN_TAG = "mlflow.parentRunId"
ROLE_TAG = "autokd.role"
STUDY_TAG = "autokd.study"
TRIAL_TAG = "autokd.trial"
STATE_TAG = "autokd.state"
FAIL_REASON_TAG = "autokd.fail_reason"
RUN_KEY_TAG = "autokd.run_key"  # names a run before MLflow gives it an id: a replayed creation is not repeated
# The kind MLflow 3's UI reads for a model-training experiment (mlflow/server/js:
# ExperimentKind.CUSTOM_MODEL_DEVELOPMENT), as opposed to a GenAI one.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

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


def _sqlite_path(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def is_http(tracking_uri: str) -> bool:
    """Whether ``tracking_uri`` names a tracking server (rather than a store this process opens itself)."""
    return tracking_uri.startswith(_HTTP_SCHEMES)


def experiment_id_of(tracking_uri: str, name: str) -> str | None:
    """The id of the experiment named ``name`` in a store (None if it has none)."""
    from mlflow.tracking import MlflowClient

    limit_http_retries(tracking_uri)  # a server that is down: an error in seconds, not minutes
    experiment = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(name)
    return None if experiment is None else experiment.experiment_id


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


def _attempt(what: str, fn: Callable[..., _T], *args: Any, attempts: int = 2, delay: float = 1.0,
             **kwargs: Any) -> tuple[bool, _T | None]:
    """Run one MLflow call; retry transient errors, then warn instead of raising. Returns (ok, result)."""
    for attempt in range(1, attempts + 1):
        try:
            return True, fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never kill a trial
            if _error_code(exc) in _PERMANENT_ERRORS or attempt == attempts:
                logger.warning("MLflow: %s failed (%s); continuing without it", what, _first_line(exc))
                return False, None
            time.sleep(delay * attempt)
    return False, None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def _call(what: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T | None:
    """``_attempt`` for callers that only need the result (None on failure)."""
    return _attempt(what, fn, *args, **kwargs)[1]


def _now_ms() -> int:
    return int(time.time() * 1000)


# How often, during an outage, the store is asked whether it answers again (at most; only when there is a call).
PROBE_INTERVAL_S = 5.0


class _Sender:
    """Sends MLflow calls in order on one daemon thread; keeps them in an on-disk spool while the store is down.

    Every call is a plain record (``op``, the run's key, its arguments, the time it was made), so it can be
    written to disk and sent later exactly as it would have been sent now (metric timestamps, start and end
    times are the original ones). A run is named by a key chosen here; its MLflow id is known once its
    ``create_run`` has been sent. Per-epoch logging thus never waits for MLflow, and ``drain`` waits until
    every call so far was sent or spooled.

    Outage. A call that fails with an error that may go away (anything but MLflow's permanent error codes:
    connection refused, a timeout, a 5xx, a locked database) starts an outage: one warning line, then that call
    and every later one are appended to ``<study dir>/mlflow_spool/<host>-<pid>-<time>.jsonl`` in the order
    they were made. At most every ``PROBE_INTERVAL_S`` while calls keep coming (and at ``flush``), the store is
    asked whether it answers; when it does, the spool is replayed in order and one line says so. The number
    of spooled calls already sent is kept next to the spool (``.done``), so a replay that is interrupted goes
    on where it stopped; a run is created with a ``autokd.run_key`` tag and a replayed creation first looks
    for a run with that tag, so a run is never created twice. A spool left by a process that ended during the
    outage (its file lock is free) is replayed by the next tracker made for the study (``make_tracker``: the
    next search, report, or ``autokd sync-mlflow``).
    """

    def __init__(self, client: MlflowClient, tracking_uri: str, experiment_id: str, spool_dir: Path | None) -> None:
        self._client = client
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.spool_dir = spool_dir
        self.ids: dict[str, str | None] = {}
        self._pending: deque[dict[str, Any]] = deque()
        self._unfinished = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._spool_path: Path | None = None
        self._spool_fh: IO[bytes] | None = None
        self._spooled = 0
        self._last_probe = 0.0
        atexit.register(self._drain_at_exit)

    @property
    def spooling(self) -> bool:
        """Whether calls are being kept on disk because the store does not answer."""
        return self._spool_fh is not None

    def _drain_at_exit(self) -> None:
        if not self.drain(timeout=60.0):
            logger.warning("MLflow: calls still queued at exit after 60 s; they are lost")
        if self._spool_fh is not None:
            logger.warning("MLflow: %d call(s) for %s are kept in %s; they are sent at the next start (or run "
                           "`autokd sync-mlflow --study NAME`)", self._spooled, self.tracking_uri, self._spool_path)

    def submit(self, record: dict[str, Any]) -> None:
        """Queue one call record behind the ones submitted before it."""
        record.setdefault("t", _now_ms())
        with self._cond:
            self._pending.append(record)
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
                record = self._pending.popleft()
            try:
                self._handle(record)
            except BaseException:  # noqa: BLE001 - keep the writer alive
                logger.exception("MLflow: a queued call failed")
            finally:
                with self._cond:
                    self._unfinished -= 1
                    self._cond.notify_all()

    def drain(self, timeout: float = 300.0) -> bool:
        """Wait until every submitted call was sent or spooled; False if ``timeout`` seconds passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._unfinished:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    # -- sending -------------------------------------------------------------------------------------------

    def _handle(self, record: dict[str, Any]) -> None:
        if record["op"] == "recover":
            if self.spooling:
                self._recover()
            return
        if self.spooling and time.monotonic() - self._last_probe >= PROBE_INTERVAL_S:
            self._recover()
        if self.spooling:
            self._spool(record)
            return
        error = self._send(record, replay=False)
        if error is not None:
            self._start_outage(record, error)

    def _send(self, record: dict[str, Any], replay: bool) -> BaseException | None:
        """Send one record: None when sent (or dropped on a permanent error), else the error of a down store."""
        for attempt in (1, 2):
            try:
                self._apply(record, replay)
                return None
            except Exception as exc:  # noqa: BLE001 - tracking must never kill a trial
                if _error_code(exc) in _PERMANENT_ERRORS:
                    logger.warning("MLflow: %s failed (%s); continuing without it", _describe(record), _first_line(exc))
                    if record["op"] == "create_run":
                        self.ids[record["key"]] = None
                    return None
                if attempt == 2 or replay:
                    return exc
                time.sleep(1.0)
        return None

    def _apply(self, record: dict[str, Any], replay: bool) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client, op, key = self._client, record["op"], record["key"]
        if op == "create_run":
            if replay:
                found = client.search_runs([record["experiment_id"]],
                                           filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
                if found:
                    self.ids[key] = found[0].info.run_id
                    return
            run = client.create_run(record["experiment_id"], start_time=record["t"], tags=record["tags"],
                                    run_name=record["name"])
            self.ids[key] = run.info.run_id
            return
        run_id = record.get("run_id") or self.ids.get(key)
        if not run_id:
            return  # its run could not be created (already warned): its calls are skipped
        if op == "log_batch":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in record.get("metrics", [])]
            params = [Param(k, v) for k, v in record.get("params", [])]
            tags = [RunTag(k, v) for k, v in record.get("tags", [])]
            client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        elif op == "log_artifacts":
            client.log_artifacts(run_id, record["path"], record.get("artifact_path"))
        elif op == "log_artifact":
            client.log_artifact(run_id, record["path"], record.get("artifact_path"))
        elif op == "set_terminated":
            client.set_terminated(run_id, record["status"], end_time=record["t"])
        elif op == "set_status":
            client.update_run(run_id, status=record["status"])
        else:
            raise ValueError(f"unknown MLflow call record {op!r}")

    # -- outage --------------------------------------------------------------------------------------------

    def _start_outage(self, record: dict[str, Any], error: BaseException) -> None:
        if self.spool_dir is None:
            logger.warning("MLflow: %s failed (%s); continuing without it", _describe(record), _first_line(error))
            return
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        name = f"{_safe_dirname(socket.gethostname())}-{os.getpid()}-{_now_ms()}.jsonl"
        self._spool_path = self.spool_dir / name
        from autokd.utils.locks import try_lock  # fcntl: imported where a lock is taken, so `autokd ui` needs none

        self._spool_fh = open(self._spool_path, "ab")  # noqa: SIM115 - held for the outage
        try_lock(self._spool_fh)  # held while we live: the next start replays only spools of ended processes
        self._spooled = 0
        self._last_probe = time.monotonic()
        logger.warning("MLflow: %s failed (%s): %s is not answering; its calls are kept in %s and sent when it "
                       "answers again", _describe(record), _first_line(error), self.tracking_uri, self._spool_path)
        self._spool(record)

    def _spool(self, record: dict[str, Any]) -> None:
        out = dict(record)
        if not out.get("run_id") and out["op"] != "create_run" and self.ids.get(out["key"]):
            out["run_id"] = self.ids[out["key"]]  # another process may replay it: it cannot know our keys
        assert self._spool_fh is not None  # only called while spooling
        # A whole line or none: after a write that a full disk cut short, the next call must not land on it.
        append_line(self._spool_fh, (json.dumps(out, separators=(",", ":")) + "\n").encode("utf-8"))
        self._spooled += 1

    def _probe(self) -> bool:
        self._last_probe = time.monotonic()
        if is_http(self.tracking_uri):
            try:
                with urllib.request.urlopen(self.tracking_uri.rstrip("/") + "/health", timeout=3):
                    return True
            except urllib.error.HTTPError:
                return True
            except (urllib.error.URLError, OSError, socket.timeout):
                return False
        try:
            self._client.get_experiment(self.experiment_id)
            return True
        except Exception:  # noqa: BLE001
            return False

    def _recover(self) -> None:
        if not self._probe():
            return
        assert self._spool_path is not None
        sent, done = self.replay(self._spool_path)
        if not done:
            return  # down again mid-replay: keep spooling (replay goes on from the .done count)
        assert self._spool_fh is not None
        self._spool_fh.close()
        self._spool_fh = None
        if self.spool_dir is not None:
            with contextlib.suppress(OSError):
                self.spool_dir.rmdir()  # only when empty: another process's spool stays
        logger.warning("MLflow: %s answers again; sent the %d call(s) kept during the outage", self.tracking_uri,
                       sent)

    def replay(self, path: Path) -> tuple[int, bool]:
        """Send a spool file's calls in order from where an earlier replay stopped; (sent, whether all were).

        A line that is not a call record (not UTF-8, not JSON, not the shape of a call: a line torn by a crash,
        a file edited by hand) is appended to ``<spool>.rejected`` and the replay goes on; one line says how
        many were set aside. Only a store that does not answer stops it. A finished spool and its ``.done``
        count are removed (a ``.rejected`` file stays, for whoever wants to look at it).
        """
        done_path = path.with_name(path.name + ".done")
        try:
            start = max(0, int(done_path.read_text().strip() or 0)) if done_path.exists() else 0
        except ValueError:
            start = 0
        lines = path.read_bytes().split(b"\n")
        if lines and not lines[-1]:
            lines.pop()  # the file's final line end
        sent = 0
        rejected: Counter[str] = Counter()  # why each line was set aside
        try:
            for index in range(start, len(lines)):
                record, problem = _spooled_record(lines[index])
                if record is None:
                    _reject(path, lines[index])
                    rejected[problem or "not a call record"] += 1
                    atomic_write_text(done_path, str(index + 1))  # set aside once, even if the replay stops later
                    continue
                if self._send(record, replay=True) is not None:
                    atomic_write_text(done_path, str(index))  # a torn count would replay the whole spool again
                    return sent, False
                sent += 1
                if sent % 50 == 0:
                    atomic_write_text(done_path, str(index + 1))
        finally:
            if rejected:
                why = ", ".join(f"{count} {reason}" for reason, count in sorted(rejected.items()))
                logger.warning("MLflow: set aside %d line(s) of %s that are not call records (%s) and went on "
                               "with the calls after them; the lines are in %s", sum(rejected.values()), path, why,
                               _rejected_path(path))
        path.unlink(missing_ok=True)
        done_path.unlink(missing_ok=True)
        return sent, True


# What a spooled call record holds (as `_Sender` writes it), checked before a replay sends it.
_RUN_STATUSES = frozenset({"RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_rows(value: object, *checks: Callable[[object], bool]) -> bool:
    """Whether ``value`` is a list of lists whose items pass ``checks``, one check per column."""
    return isinstance(value, list) and all(
        isinstance(row, list) and len(row) == len(checks) and all(check(v) for check, v in zip(checks, row))
        for row in value)


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _artifact_shape(record: dict[str, Any]) -> bool:
    return _is_str(record.get("path")) and (record.get("artifact_path") is None or _is_str(record["artifact_path"]))


def _status_shape(record: dict[str, Any]) -> bool:
    return _is_str(record.get("status")) and record["status"] in _RUN_STATUSES


_CALL_SHAPES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "create_run": lambda r: (_is_str(r.get("experiment_id")) and _is_str(r.get("name"))
                             and isinstance(r.get("tags"), dict) and all(_is_str(v) for v in r["tags"].values())),
    "log_batch": lambda r: (_is_rows(r.get("metrics", []), _is_str, _is_number, _is_int, _is_int)
                            and _is_rows(r.get("params", []), _is_str, _is_str)
                            and _is_rows(r.get("tags", []), _is_str, _is_str)),
    "log_artifacts": _artifact_shape,
    "log_artifact": _artifact_shape,
    "set_terminated": _status_shape,
    "set_status": _status_shape,
}


def _shape_problem(record: object) -> str | None:
    """Why ``record`` is not a call record of the kind `_Sender` spools, or None when it is one."""
    if not isinstance(record, dict):
        return "not a JSON object"
    op = record.get("op")
    if not _is_str(op) or op not in _CALL_SHAPES:
        return "not a known call"
    run_id = record.get("run_id")
    if (_is_str(record.get("key")) and _is_int(record.get("t")) and (run_id is None or _is_str(run_id))
            and _CALL_SHAPES[op](record)):
        return None
    return "not the shape of its call"


def _spooled_record(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(the call record on one spool line, None) or (None, why the line is not one)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return None, "not JSON"
    problem = _shape_problem(record)
    return (None, problem) if problem else (record, None)


def _rejected_path(spool: Path) -> Path:
    """Where the lines of a spool that are not call records are set aside: ``<spool>.rejected``."""
    return spool.with_name(spool.name + ".rejected")


def _reject(spool: Path, line: bytes) -> None:
    with open(_rejected_path(spool), "ab") as handle:
        append_line(handle, line + b"\n")


def _describe(record: dict[str, Any]) -> str:
    op = record["op"]
    what = {"create_run": f"create run {record.get('name', '')}".strip(), "log_batch": "log_batch",
            "log_artifacts": f"log_artifacts {record.get('path')}", "log_artifact": f"log artifact {record.get('path')}",
            "set_terminated": f"end run as {record.get('status')}", "set_status": f"set run {record.get('status')}"}
    return record.get("what") or what.get(op, op) + (f" (run {record['run_id']})" if record.get("run_id") else "")


def replay_spools(client: MlflowClient, tracking_uri: str, experiment_id: str,
                  spool_dir: Path) -> tuple[int, int]:
    """Send the spools that ended processes left in ``spool_dir``; returns (calls sent, spools still kept)."""
    if not spool_dir.is_dir():
        return 0, 0
    from autokd.utils.locks import try_lock  # fcntl: imported where a lock is taken, so `autokd ui` needs none

    sender = _Sender(client, tracking_uri, experiment_id, None)
    sent = kept = 0
    for path in sorted(spool_dir.glob("*.jsonl")):
        with open(path, "a", encoding="utf-8") as fh:
            if not try_lock(fh):
                continue  # its process still runs and replays it itself
            if not sender._probe():  # noqa: SLF001
                kept += 1
                continue
            count, done = sender.replay(path)
            sent += count
            kept += int(not done)
    if sent or kept:
        message = (f"MLflow: sent {sent} call(s) kept from an earlier outage of {tracking_uri}"
                   + (f"; {kept} spool(s) still kept in {spool_dir} (it does not answer)" if kept else ""))
        logger.warning(message)
    with contextlib.suppress(OSError):
        spool_dir.rmdir()  # only when empty
    return sent, kept


def _quiet_downloads() -> None:
    # MLflow draws a progress bar per download: noise between a worker's progress lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class MlflowArtifactReader(ArtifactReader):
    """Reads run artifacts from an MLflow store through an explicit ``MlflowClient``."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client
        self._experiments: dict[str, str] = {}  # parent run id -> its experiment's id

    def download_artifacts(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        _quiet_downloads()
        return Path(self._client.download_artifacts(run_id, artifact_path, str(dst)))

    def finished_trial_run(self, parent_run_id: str, trial_number: int) -> str | None:
        if parent_run_id not in self._experiments:
            self._experiments[parent_run_id] = self._client.get_run(parent_run_id).info.experiment_id
        runs = self._client.search_runs([self._experiments[parent_run_id]], max_results=1, filter_string=(
            f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_number}' "
            "and attributes.status = 'FINISHED'"))
        return runs[0].info.run_id if runs else None


class MlflowTrialRun(TrialRun):
    """A run in MLflow whose calls go through the tracker's sender (in order, in the background, spooled while
    the store is down). ``run_id`` waits for a creation still queued; "" if the run could not be created."""

    def __init__(self, sender: _Sender, key: str) -> None:
        self._sender = sender
        self._key = key
        self._ended = False

    @property
    def run_id(self) -> str:
        if self._key not in self._sender.ids:
            self.flush()
        return self._sender.ids.get(self._key) or ""

    def _submit(self, op: str, **args: Any) -> None:
        self._sender.submit({"op": op, "key": self._key, **args})

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        items = _metric_list(metrics, epoch, "log_epoch")
        for chunk in _chunks(items, _MAX_METRICS_PER_BATCH):
            self._submit("log_batch", metrics=chunk, what=f"log_epoch {epoch}")

    def log_metrics(self, metrics: dict[str, float]) -> None:
        items = _metric_list(metrics, 0, "log_metrics")
        for chunk in _chunks(items, _MAX_METRICS_PER_BATCH):
            self._submit("log_batch", metrics=chunk)

    def log_params(self, params: dict[str, object]) -> None:
        items = [[str(k), _truncate(v, _MAX_PARAM_VAL_LENGTH)] for k, v in params.items()]
        for chunk in _chunks(items, _MAX_PARAMS_TAGS_PER_BATCH):
            self._submit("log_batch", params=chunk)

    def set_tags(self, tags: dict[str, str]) -> None:
        items = [[str(k), _truncate(v, _MAX_TAG_VAL_LENGTH)] for k, v in tags.items()]
        for chunk in _chunks(items, _MAX_PARAMS_TAGS_PER_BATCH):
            self._submit("log_batch", tags=chunk)

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        self._submit("log_artifacts", path=str(Path(local_dir).resolve()), artifact_path=artifact_path)

    def flush(self) -> None:
        if not self._sender.drain():
            logger.warning("MLflow: run %s still has calls queued after 300 s; going on", self._key)

    def end(self, state: str, reason: str | None = None) -> None:
        if state not in MLFLOW_STATUS:
            raise ValueError(f"unknown terminal trial state {state!r}; expected one of {sorted(MLFLOW_STATUS)}")
        if self._ended:
            return
        self._ended = True
        tags = {STATE_TAG: state}
        if reason:
            tags[FAIL_REASON_TAG] = reason
        self.set_tags(tags)
        self._submit("set_terminated", status=MLFLOW_STATUS[state])
        if state == "INTERRUPTED":
            self.flush()  # the process is about to exit: the KILLED status must be in the store (or spool) first


def _metric_list(metrics: dict[str, float], step: int, what: str) -> list[list[Any]]:
    now = _now_ms()
    out = []
    for key, value in metrics.items():
        try:
            out.append([str(key), float(value), now, int(step)])
        except (TypeError, ValueError):
            logger.warning("MLflow: %s: metric %r has non-numeric value %r; skipped", what, key, value)
    return out


class MlflowTracker(Tracker):
    """Tracker writing to an MLflow store through an explicit ``MlflowClient``."""

    enabled = True

    def __init__(self, client: MlflowClient, tracking_uri: str, experiment_name: str, experiment_id: str,
                 spool_dir: Path | None = None) -> None:
        super().__init__(experiment_name)
        self._client = client
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.study_name = experiment_name
        self._sender = _Sender(client, tracking_uri, experiment_id, spool_dir)  # one writer for this worker
        self._reader = MlflowArtifactReader(client)

    def flush(self) -> None:
        if self._sender.spooling:
            self._sender.submit({"op": "recover", "key": ""})  # the store may answer again by now
        if not self._sender.drain():
            logger.warning("MLflow: trial runs still have calls queued after 300 s; going on")

    @property
    def spooling(self) -> bool:
        """Whether this worker is keeping calls on disk because the store does not answer."""
        return self._sender.spooling

    def _known(self, run_id: str) -> MlflowTrialRun:
        key = "id:" + run_id
        self._sender.ids[key] = run_id
        return MlflowTrialRun(self._sender, key)

    def create_parent_run(self, study_name: str, tags: dict[str, str], params: dict[str, object]) -> str | None:
        self.study_name = study_name
        all_tags = {str(k): _truncate(v, _MAX_TAG_VAL_LENGTH) for k, v in tags.items()}
        all_tags.update({STUDY_TAG: study_name, ROLE_TAG: "parent"})
        run = _call("create parent run", self._client.create_run, self.experiment_id,
                    run_name=study_name, tags=all_tags)
        if run is None:
            return None
        run_id = run.info.run_id
        self._known(run_id).log_params(params)
        self.flush()
        return run_id  # RUNNING until the search reaches its budget (end_parent)

    def resume_parent(self, parent_run_id: str) -> None:
        if parent_run_id:
            self._known(parent_run_id)._submit("set_status", status="RUNNING")  # noqa: SLF001
            self.flush()

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
        key = uuid.uuid4().hex
        all_tags = {str(k): _truncate(v, _MAX_TAG_VAL_LENGTH) for k, v in tags.items()}
        all_tags.update({STUDY_TAG: self.study_name, ROLE_TAG: "trial", TRIAL_TAG: str(trial_number),
                         RUN_KEY_TAG: key})
        if parent_run_id:
            all_tags[PARENT_RUN_TAG] = parent_run_id
        # Created on the background writer like the run's other calls: a synchronous create_run was most of
        # what MLflow still cost a trial (a SQLite or HTTP round trip in line).
        self._sender.submit({"op": "create_run", "key": key, "experiment_id": self.experiment_id,
                             "name": f"trial-{trial_number}", "tags": all_tags,
                             "what": f"create run for trial {trial_number}"})
        trial_run = MlflowTrialRun(self._sender, key)
        trial_run.log_params(params)
        return trial_run

    def _running_children(self, parent_run_id: str) -> list[Run]:
        runs: list[Run] = []
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
        a trial missing from ``trial_states`` is unknown to the study and its run is KILLED too. Skipped while
        the store does not answer (the spool ends our own runs; the next start closes the others).
        """
        from mlflow.entities import RunTag

        if not parent_run_id:
            return 0
        self.flush()  # our own runs' end calls may still be queued: they are not stale
        if self._sender.spooling:
            return 0
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
            elif state in MLFLOW_STATUS:
                status, reason = MLFLOW_STATUS[state], None
            else:
                status, reason = "KILLED", f"trial {raw} is unknown to the study"
            tags = {STATE_TAG: state or "UNKNOWN"}
            if reason:
                tags[FAIL_REASON_TAG] = reason
            tag_list = [RunTag(k, v) for k, v in tags.items()]
            _call(f"tag stale run {run.info.run_id}", self._client.log_batch, run.info.run_id, tags=tag_list)
            ok, _ = _attempt(f"close stale run {run.info.run_id}", self._client.set_terminated,
                             run.info.run_id, status)
            closed += int(ok)
        return closed

    def log_parent_artifacts(self, parent_run_id: str, files: list[Path], artifact_path: str = "report") -> None:
        if not parent_run_id:
            return
        parent = self._known(parent_run_id)
        for path in files:
            parent._submit("log_artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)  # noqa: SLF001
        self.flush()

    def upload_artifacts(self, run_id: str, files: list[Path], artifact_path: str) -> None:
        for path in files:
            self._client.log_artifact(run_id, str(path), artifact_path)

    def download_artifacts(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        return self._reader.download_artifacts(run_id, artifact_path, dst)

    def finished_trial_run(self, parent_run_id: str, trial_number: int) -> str | None:
        return self._reader.finished_trial_run(parent_run_id, trial_number)

    def end_parent(self, parent_run_id: str, status: str = "FINISHED") -> None:
        if parent_run_id:
            self._known(parent_run_id)._submit("set_terminated", status=status)  # noqa: SLF001
            self.flush()


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


def _get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(exc).lower():
                raise
            experiment = client.get_experiment_by_name(name)  # another worker created it just now
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def limit_http_retries(uri: str | None) -> None:
    """For an HTTP tracking server, fail in seconds rather than after MLflow's minutes of retries per call, unless
    the user chose their own ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT``."""
    if uri and is_http(uri):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def open_tracker(uri: str, studies_root: Path, experiment_name: str, spool: Path) -> MlflowTracker:
    """The MLflow tracker of experiment ``experiment_name`` at ``uri`` (created if missing), after replaying what
    an outage left in ``spool``. Raises UserError when the store cannot be reached or used."""
    artifact_location = None
    if is_http(uri):
        limit_http_retries(uri)
        # MlflowClient.set_terminated on an HTTP store prints two "View run/experiment at" lines per run (one
        # extra get_run round trip each): 100 lines of noise between the progress lines of a 50-trial search.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        _check_reachable(uri)
    elif not uri.startswith("databricks"):
        # Database stores write artifacts client-side; keep them with the studies, not in the cwd's ./mlruns.
        artifact_location = (studies_root / "mlartifacts" / _safe_dirname(experiment_name)).resolve().as_uri()

    from mlflow.tracking import MlflowClient

    from autokd.utils.locks import file_lock  # fcntl: imported where a lock is taken, so `autokd ui` needs none

    db_path = _sqlite_path(uri)
    lock = file_lock(db_path.with_name(db_path.name + ".lock")) if db_path else contextlib.nullcontext()
    try:
        with lock:  # first use of a fresh SQLite file runs migrations; two processes at once would collide
            client = MlflowClient(tracking_uri=uri)
            experiment_id = _get_or_create_experiment(client, experiment_name, artifact_location)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to reach/use the store is a setup problem
        first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
        hint = ("start the tracking server" if is_http(uri)
                else "check the URI (local default: sqlite:///<studies>/mlflow.db)")
        raise UserError(f"cannot use MLflow tracking URI {uri!r}: {first}. Fix it ({hint}), pass another "
                        f"--tracking-uri, or run with --no-mlflow.") from exc
    replay_spools(client, uri, experiment_id, spool)  # what an outage kept from an earlier run
    return MlflowTracker(client, uri, experiment_name, experiment_id, spool)


def artifact_reader(tracking_uri: str) -> MlflowArtifactReader:
    """A reader of the run artifacts in the store at ``tracking_uri`` (nothing is created there)."""
    from mlflow.tracking import MlflowClient

    limit_http_retries(tracking_uri)  # a server that is down: an error in seconds, not minutes
    return MlflowArtifactReader(MlflowClient(tracking_uri=tracking_uri))

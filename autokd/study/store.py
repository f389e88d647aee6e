"""Create, load and resume studies: storage choice, the cross-process study lock, the budget and stale trials.

Also finds the trials of dead workers: by pid on this machine (`reap_dead_trials`), by missing heartbeats on
others (`fail_stale_trials`, RDB storages only); either way the trial is failed, marked requeued and its
parameters queued again once.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState

from autokd._internals.optuna import stale_trial_ids, storage_of, trial_id
from autokd.config import SAMPLERS
from autokd.errors import UserError
from autokd.study.record import (
    DATA_SETTINGS,
    PINNED_ATTRS,
    REQUEUED_ATTR,
    RETRY_OF_ATTR,
    WORKER_ATTR,
    fail_dead_worker_trial,
    queue_retry,
)
from autokd.utils.appendonly import cut_torn_tail, ends_with_line_end
from autokd.utils.locks import file_lock

DIRECTIONS = ["maximize", "minimize"]  # validation accuracy, latency (ms)
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
HEARTBEAT_INTERVAL_S = 10
HEARTBEAT_GRACE_S = 40
# Overrides of the heartbeat interval / grace period in whole seconds (tests use 1 / 3).
HEARTBEAT_INTERVAL_ENV = "AUTOKD_HEARTBEAT_INTERVAL"
HEARTBEAT_GRACE_ENV = "AUTOKD_HEARTBEAT_GRACE"
# The host name a worker reports in its trials (default: the machine's hostname).
WORKER_HOST_ENV = "AUTOKD_WORKER_HOST"

# The study's objectives by name, so optuna-dashboard and every other Optuna tool label them.
METRIC_NAMES = ["val_acc", "latency_ms"]


def journal_path(root: Path) -> Path:
    """The local journal file shared by all studies under `root`."""
    return root / "optuna.journal"


def storage_url(storage: str | None, root: Path) -> str:
    """Canonical description of the storage (what `--storage` resolves to), for messages and child workers."""
    return storage if storage else str(journal_path(root))


def _journal_file(storage: str | None, root: Path) -> Path | None:
    """The journal file a `--storage` value names (none: the shared local journal), or None for a URL."""
    if not storage or storage.endswith((".journal", ".log")) or storage.startswith("journal:"):
        return Path(storage.removeprefix("journal:")) if storage else journal_path(root)
    return None


def storage_missing(storage: str | None, root: Path) -> bool:
    """Whether a local storage (journal or SQLite file) does not exist yet: then it holds no study.

    Commands that only read a study check this first, because opening a local storage creates its file and a
    command that fails on its input must leave nothing behind.
    """
    journal = _journal_file(storage, root)
    if journal is not None:
        return not journal.exists()
    if storage.startswith("sqlite:///"):
        path = storage[len("sqlite:///"):].split("?", 1)[0]
        return path not in ("", ":memory:") and not Path(path).exists()
    return False


def make_storage(storage: str | None, root: Path) -> BaseStorage:
    """Open the Optuna storage: the shared local journal by default, or an RDB URL (PostgreSQL for scale-out).

    The journal (`studies/optuna.journal`, one file for all studies) is safe for several worker processes on
    one machine (appends go under a file lock, where SQLite raises "database is locked") and
    `optuna-dashboard studies/optuna.journal` opens it directly. A journal's torn last line (a write cut short
    by kill -9 or a full disk) is cut off before anything appends (see `TornTailJournalBackend`). An RDB
    storage gets heartbeats, so that a trial of a worker that died on another machine is failed and retried.
    """
    path = _journal_file(storage, root)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(TornTailJournalBackend(str(path)))
    if "://" not in storage:
        raise UserError(f"--storage {storage!r}: not a storage URL; valid: a path ending in .journal, "
                        "sqlite:///FILE.db, or postgresql://USER@HOST/DB")
    interval, grace = heartbeat_settings()
    # Several workers opening a fresh database at once would all create Optuna's tables, and all but one fail
    # (duplicate key in pg_type): the first creates them while the others wait.
    init_lock = _pg_advisory_lock(storage, "autokd:schema") if storage.startswith("postgresql") else \
        contextlib.nullcontext()
    try:
        with init_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            return RDBStorage(_sqlalchemy_url(storage), heartbeat_interval=interval, grace_period=grace,
                              **{_STALE_CALLBACK_ARG: heartbeat_retry_callback},
                              engine_kwargs={"pool_pre_ping": True} if storage.startswith("postgresql") else None)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many kinds; all mean the URL is unusable
        raise UserError(f"--storage {storage!r}: cannot open the study storage: {exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}. Check the URL and that the database "
                        "server answers.") from exc


class TornTailJournalBackend(JournalFileBackend):
    """Optuna's journal file backend (fsync on every append, under its file lock) that never appends onto a torn
    last line.

    Optuna skips a torn last line when it reads, but its next append lands on it and leaves one broken line
    inside the journal, which every later read fails on. So the last line is checked when the journal is
    opened, and before each append that finds no line end at the end of the file (a write that a full disk
    cut short, in a worker that went on), and a torn one is cut off under the lock Optuna appends under (its
    bytes are kept beside the journal: `autokd.utils.appendonly.cut_torn_tail`).
    """

    def __init__(self, file_path: str) -> None:
        # The lock Optuna's backend would make itself, made here so the cut goes under the very same lock
        # (a symlink next to the journal: every process's lock object for this path is the same lock).
        lock = JournalFileSymlinkLock(file_path)
        super().__init__(file_path, lock_obj=lock)
        self._journal, self._journal_lock = Path(file_path), lock
        cut_torn_tail(self._journal, lock)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        """Optuna's append, after cutting a torn last line that a write cut short may have left."""
        if not ends_with_line_end(self._journal):
            cut_torn_tail(self._journal, self._journal_lock)
        super().append_logs(logs)


# Optuna 4.9 renamed RDBStorage's failed_trial_callback (deprecated, removed in 6.0) to this.
_STALE_CALLBACK_ARG = ("heartbeat_stale_trial_callback"
                       if "heartbeat_stale_trial_callback" in inspect.signature(RDBStorage).parameters
                       else "failed_trial_callback")


def _sqlalchemy_url(url: str) -> str:
    """`postgresql://` with the PostgreSQL driver that is installed (SQLAlchemy 2.1 assumes psycopg 3)."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def heartbeat_settings() -> tuple[int, int]:
    """(interval, grace period) in seconds of the RDB heartbeat; $AUTOKD_HEARTBEAT_INTERVAL/_GRACE override."""
    values = []
    for env, default in ((HEARTBEAT_INTERVAL_ENV, HEARTBEAT_INTERVAL_S), (HEARTBEAT_GRACE_ENV, HEARTBEAT_GRACE_S)):
        text = os.environ.get(env, "").strip()
        if not text:
            values.append(default)
            continue
        if not text.isdigit() or int(text) < 1:
            raise UserError(f"${env}={text!r}: must be a whole number of seconds >= 1 (default {default})")
        values.append(int(text))
    interval, grace = values
    if grace <= interval:
        raise UserError(f"${HEARTBEAT_GRACE_ENV}={grace}: the grace period must be longer than the heartbeat "
                        f"interval ({interval} s), or live workers' trials would be failed")
    return interval, grace


@contextlib.contextmanager
def study_lock(storage: str | None, root: Path, study_name: str) -> Iterator[None]:
    """Exclusive lock over one study, across processes (and machines, on PostgreSQL).

    Held while a worker creates the study, reaps dead workers' trials, and claims a budget slot, so that
    workers never create two studies, never retry the same dead trial twice, and never overshoot the budget.
    """
    if storage and storage.startswith("postgresql"):
        with _pg_advisory_lock(storage, f"autokd:{study_name}"):
            yield
        return
    with file_lock(root / ".locks" / f"{study_name}.lock"):
        yield


@contextlib.contextmanager
def _pg_advisory_lock(url: str, name: str) -> Iterator[None]:
    import psycopg2  # the advisory lock lives in the same database as the study

    key = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)
    conn = psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://"))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (key,))
        yield
    finally:
        conn.close()  # closing the session releases the advisory lock


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for `--sampler` (tpe, nsga2 or random)."""
    if name == "tpe":
        # constant_liar keeps parallel workers from sampling the same point while trials are running.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=10)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise UserError(f"--sampler {name!r}: unknown sampler; valid: {', '.join(SAMPLERS)}")


def open_study(name: str, storage: BaseStorage, pinned: dict[str, Any], extra_attrs: dict[str, Any],
               sampler: optuna.samplers.BaseSampler) -> tuple[optuna.Study, bool]:
    """Create the study, or load it and check it was made with the same space/dataset/teacher.

    Returns (study, created). Call under `study_lock`. Resuming with a different search space, dataset or
    teacher is refused: it would silently mix incomparable trials in one front.
    """
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        study = optuna.create_study(study_name=name, storage=storage, directions=DIRECTIONS, sampler=sampler)
        _name_metrics(study)
        for key, value in {**pinned, **extra_attrs}.items():
            study.set_user_attr(key, value)
        return study, True
    if list(study.directions) != [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]:
        raise UserError(f"study {name!r} exists in the storage but was not created by autokd (its directions "
                        f"are {[d.name for d in study.directions]}); choose another name with --study")
    attrs = study.user_attrs
    for key in PINNED_ATTRS:
        if key == "epochs" and key in attrs and key in pinned and attrs[key] != pinned[key]:
            raise UserError(
                f"study {name!r} was created with {attrs[key]} epochs per trial, this run asks for {pinned[key]} "
                f"(--epochs, or the space's epochs): a trial's accuracy depends on its epoch budget, so one front "
                f"cannot mix them. Resume with --epochs {attrs[key]}, or start a new study with --study NEW_NAME.")
        if key in attrs and key in pinned and attrs[key] != pinned[key]:
            what = {"space_fingerprint": "search space", "data_fingerprint": "dataset preprocessing/split"}.get(key, key)
            data = ""
            if key in ("dataset", "data_fingerprint"):
                current = {**pinned, **extra_attrs}
                was = ", ".join(f"{k}={attrs.get(k)}" for k in DATA_SETTINGS)
                now = ", ".join(f"{k}={current.get(k)}" for k in DATA_SETTINGS)
                data = f" It was created with {was}; this run has {now}."
            raise UserError(
                f"study {name!r} was created with a different {what} ({key}: stored {attrs[key]!r}, now "
                f"{pinned[key]!r}).{data} Resume it with the original settings (space file: "
                f"{attrs.get('space_path')}), or start a new study with --study NEW_NAME."
            )
    for key in PINNED_ATTRS:  # studies made before a setting was pinned: pin it from now on
        if key in pinned and key not in attrs:
            study.set_user_attr(key, pinned[key])
    if study.metric_names is None:
        _name_metrics(study)
    return study, False


def _name_metrics(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(METRIC_NAMES)


def budget_used(study: optuna.Study) -> int:
    """Trials that count against --budget: finished (complete, pruned, failed) plus those running now.

    A trial that was interrupted and queued again (kill -9, SIGTERM, a full disk) does not count: its retry
    does. Otherwise a crash in the last budget slot would leave its retry queued but never run. A failed trial
    with a retry (`retry_of`) counts as requeued too: Optuna's own stale-trial check fails a trial before its
    callback can mark it.
    """
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_OF_ATTR) for t in trials} - {None}
    states = (*FINISHED_STATES, TrialState.RUNNING)
    return sum(1 for t in trials if t.state in states and not t.user_attrs.get(REQUEUED_ATTR)
               and not (t.state == TrialState.FAIL and t.number in retried))


def _proc_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _node_id() -> str:
    # Pids are only comparable within one kernel boot and one pid namespace: two containers (or machines)
    # with the same hostname must not judge each other's workers dead by their pids.
    parts = []
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(source) if source.endswith("/pid") else Path(source).read_text().strip())
        except OSError:
            parts.append("?")
    return ":".join(parts)


def worker_host() -> str:
    """The host name this worker reports in its trials: $AUTOKD_WORKER_HOST, else the machine's hostname."""
    return os.environ.get(WORKER_HOST_ENV, "").strip() or socket.gethostname()


def worker_identity() -> dict[str, Any]:
    """Who runs a trial: host, pid and the pid's start time (so a reused pid is not mistaken for the worker)."""
    pid = os.getpid()
    return {"host": worker_host(), "node": _node_id(), "pid": pid, "start": _proc_start_time(pid),
            "since": time.time()}


def _same_node(worker: dict[str, Any]) -> bool:
    return worker.get("host") == worker_host() and worker.get("node", _node_id()) == _node_id()


def _worker_alive(worker: dict[str, Any]) -> bool:
    pid = int(worker.get("pid", -1))
    if pid <= 0:
        return False
    start = _proc_start_time(pid)
    return start is not None and start == worker.get("start")


def reap_dead_trials(study: optuna.Study, retry: bool = True) -> list[int]:
    """Fail RUNNING trials whose worker process on this host is gone (kill -9, power loss) and re-queue them.

    Trials of workers on other hosts are left to the RDB heartbeat (`fail_stale_trials`). Call under
    `study_lock` so one worker, not several, retries each dead trial. Returns the numbers of the trials it failed.
    """
    failed: list[int] = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if not worker or not _same_node(worker) or _worker_alive(worker):
            continue
        fail_dead_worker_trial(study, trial, "worker died (process killed while the trial was running)", retry=retry)
        failed.append(trial.number)
    return failed


def fail_stale_trials(study: optuna.Study, retry: bool = True) -> list[int]:
    """Fail RUNNING trials whose worker, on any machine, sent no heartbeat for the grace period; queue them again.

    The equivalent of `optuna.storages.fail_stale_trials` (which `study.optimize` calls before each ask), except
    that the trial is marked requeued and annotated *before* it is failed: a finished trial's attributes can no
    longer change. Only RDB storages have heartbeats; elsewhere this returns []. Call under `study_lock`.
    """
    storage = _heartbeat_storage(study)
    if storage is None:
        return []
    _, grace = heartbeat_settings()
    failed: list[int] = []
    # Not Optuna's public `fail_stale_trials`: it fails a stale trial before its callback sees it, when the
    # trial can no longer be annotated or marked requeued (see autokd.optuna_internals).
    for stale_id in stale_trial_ids(storage, study):
        trial = storage.get_trial(stale_id)
        if trial.state != TrialState.RUNNING:
            continue
        host = (trial.user_attrs.get(WORKER_ATTR) or {}).get("host", "an unknown host")
        try:
            fail_dead_worker_trial(study, trial, f"worker died: no heartbeat from its worker on {host} for more than {grace} s "
                       "(process killed, machine down or network cut)", retry=retry)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # its worker finished it after all, just now
        failed.append(trial.number)
    return failed


@runtime_checkable
class _HeartbeatStorage(Protocol):
    """What heartbeats use of an Optuna storage (RDB storage, and the cache Optuna wraps it in)."""

    def get_trial(self, trial_id: int) -> FrozenTrial: ...

    def record_heartbeat(self, trial_id: int) -> None: ...

    def get_heartbeat_interval(self) -> int | None: ...


def _heartbeat_storage(study: optuna.Study) -> _HeartbeatStorage | None:
    """The study's storage if it records heartbeats (an RDB storage made with an interval), else None."""
    storage = storage_of(study)
    if isinstance(storage, _HeartbeatStorage) and storage.get_heartbeat_interval() is not None:
        return storage
    return None


class TrialHeartbeat:
    """Records a trial's heartbeat every interval from a thread of its own until `join()`; a no-op without storage.

    What Optuna's `study.optimize` runs around each trial (a plain thread, not a daemon), through the storage's
    public `record_heartbeat` and `get_heartbeat_interval`.
    """

    def __init__(self, storage: _HeartbeatStorage | None, trial_id: int) -> None:
        self._storage, self._trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Record the first beat now, then one every heartbeat interval."""
        storage = self._storage
        interval = storage.get_heartbeat_interval() if storage is not None else None
        if storage is None or interval is None:
            return
        storage.record_heartbeat(self._trial_id)
        self._thread = threading.Thread(target=self._beat, args=(storage, interval),
                                        name=f"autokd-heartbeat-{self._trial_id}")
        self._thread.start()

    def _beat(self, storage: _HeartbeatStorage, interval: int) -> None:
        while not self._stop.wait(timeout=interval):
            storage.record_heartbeat(self._trial_id)

    def join(self) -> None:
        """Stop beating (at once) and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def start_heartbeat(study: optuna.Study, trial: optuna.Trial) -> TrialHeartbeat:
    """Start the heartbeat of a trial (a no-op where the storage has no heartbeat); `.join()` stops it.

    Optuna starts heartbeat threads and checks for stale trials only inside `study.optimize`; autokd drives
    trials with ask/tell, so the worker loop does both itself (this and `fail_stale_trials`).

    The first beat is recorded before this returns: a trial without any heartbeat is never found stale.
    """
    heartbeat = TrialHeartbeat(_heartbeat_storage(study), trial_id(trial))
    heartbeat.start()
    return heartbeat


def ask_with_heartbeat(study: optuna.Study) -> tuple[optuna.Trial, TrialHeartbeat]:
    """`study.ask()` plus the trial's heartbeat (see `start_heartbeat`); join it when the trial ends.

    Optuna warns that heartbeats are meant for `study.optimize`, which starts the thread itself: here we do.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        trial = study.ask()
    return trial, start_heartbeat(study, trial)


def heartbeat_retry_callback(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's stale-trial hook (its own check, as in `study.optimize`): queue the failed trial's params again.

    autokd's worker loop runs `fail_stale_trials` first, so this only acts on trials Optuna failed itself. The
    trial is already FAIL and cannot be marked requeued; `budget_used` recognises it by its retry's retry_of.
    """
    if trial.params and trial.user_attrs.get(RETRY_OF_ATTR) is None:
        queue_retry(study, trial)


def study_dir(root: Path, name: str) -> Path:
    """Where a study's own files live: trial checkpoints, report, logs."""
    return root / name

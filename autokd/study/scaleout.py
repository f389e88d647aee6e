"""One study over many machines: the shared teacher, comparable latencies, and the commands to start workers.

Workers share the Optuna study through PostgreSQL and the MLflow runs through a tracking server; their
`studies/` folders are their own. This module owns what else they must agree on: the teacher (published once,
fetched and verified by the others) and the study's latency signature. It reaches MLflow only through
:mod:`autokd.tracking`.
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from autokd import tracking
from autokd.errors import UserError
from autokd.model.checkpoint import WEIGHTS_FILE
from autokd.study.record import MLFLOW_PARENT_RUN_ATTR, MLFLOW_TRACKING_URI_ATTR, TEACHER_ARTIFACT_ATTR
from autokd.utils.atomic import file_digest

if TYPE_CHECKING:
    import optuna

TEACHER_FILES = ("model.safetensors", "meta.json")  # meta.json last: its presence marks a complete cache entry

logger = logging.getLogger(__name__)


def is_shared_storage(storage: str | None) -> bool:
    """True for a database URL (`--storage postgresql://...`), which workers on other machines may share."""
    return bool(storage) and "://" in str(storage)


# ---------------------------------------------------------------------------------------------------------
# the shared teacher
# ---------------------------------------------------------------------------------------------------------

def publish_teacher(study: optuna.Study, weights: Path, arch: str, tracker: tracking.Tracker,
                    parent_run_id: str | None, host: str) -> dict[str, Any] | None:
    """Publish the teacher cache entry holding `weights` for the other workers of `study` (once per study).

    Uploads it to the study's MLflow parent run (under `teacher/<cache entry>/`) when tracking is on and records
    `teacher_artifact` in the study: the run, the entry's name, its host path and the weights' SHA-256. Call
    under the study lock; the other workers wait on that lock for it. Returns the record, or None when the
    study already has one.

    Only shared storages publish: with a local journal the teacher cache's file lock already shares the
    teacher. A `--teacher-checkpoint` is not published either: every machine reads its own copy, and the
    study's teacher id (architecture + file SHA-1) makes sure they are the same file.
    """
    if study.user_attrs.get(TEACHER_ARTIFACT_ATTR):
        return None
    entry = weights.parent
    record: dict[str, Any] = {"arch": arch, "entry": entry.name, "sha256": file_digest(weights), "host": host,
                              "path": str(entry.resolve())}
    tracking_uri = tracker.tracking_uri
    if tracker.enabled and parent_run_id:
        artifact_path = f"teacher/{entry.name}"
        try:
            tracker.upload_artifacts(parent_run_id, [entry / name for name in TEACHER_FILES], artifact_path)
        except Exception as exc:  # noqa: BLE001 - any failure means the other workers could not get it
            raise UserError(f"cannot publish the teacher {entry} to MLflow run {parent_run_id} at {tracking_uri}: "
                            f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. The other "
                            "workers of the study need it; fix the tracking server (its --artifacts-destination "
                            "must be writable) and rerun the same command.") from exc
        record.update(run_id=parent_run_id, tracking_uri=tracking_uri, artifact_path=artifact_path)
        where = f"MLflow run {parent_run_id} ({tracking_uri}), artifacts {artifact_path}/"
    else:
        where = f"{host}:{record['path']} (no MLflow server: other machines need that path on a shared filesystem)"
    study.set_user_attr(TEACHER_ARTIFACT_ATTR, record)
    logger.info(f"teacher {arch}: published for the other workers of study {study.study_name!r}: {where}")
    return record


def fetch_teacher(study: optuna.Study, cache_root: Path, tracker: tracking.Tracker) -> Path | None:
    """Put the study's published teacher into this machine's teacher cache (verified), unless it is there.

    Tried in order: this worker's MLflow store (`tracker`, when tracking is on), the store recorded by the
    publisher, the publisher's folder (where a shared filesystem makes it visible). The SHA-256 is verified,
    then ``get_teacher`` loads the entry from the cache as usual; the teacher's outputs are recomputed on each
    machine from those weights (cheap next to training, and deterministic). Returns the cache entry, or None
    when the study has published no teacher (this worker is the first).
    """
    record = study.user_attrs.get(TEACHER_ARTIFACT_ATTR)
    if not record:
        return None
    from autokd.utils.locks import file_lock

    cache_root = Path(cache_root)
    entry = cache_root / record["entry"]
    if _entry_matches(entry, record["sha256"]):
        return entry
    # The same lock `get_teacher` holds on this cache entry: no local reader sees it half replaced.
    with file_lock(cache_root / f".{entry.name}.lock"):
        if _entry_matches(entry, record["sha256"]):
            return entry
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=".fetch-"))
        try:
            source, where, errors = _download(record, tmp, tracker)
            if source is None:
                raise UserError(
                    f"study {study.study_name!r}: its teacher was trained on {record.get('host')} and cannot be "
                    f"fetched here ({'; '.join(errors)}). Start this worker with the study's MLflow server, "
                    f"--tracking-uri {record.get('tracking_uri') or 'http://HOST:PORT'}, or make "
                    f"{record['path']} visible on this machine (shared filesystem), or give every worker the same "
                    "--teacher-checkpoint.")
            got = file_digest(source / "model.safetensors")
            if got != record["sha256"]:
                raise UserError(f"study {study.study_name!r}: the teacher fetched from {source} is corrupt (SHA-256 "
                                f"{got[:12]}..., published {record['sha256'][:12]}...); rerun to fetch it again")
            entry.mkdir(parents=True, exist_ok=True)
            for name in TEACHER_FILES:
                os.replace(source / name, entry / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"teacher {record['arch']}: fetched the study's teacher from {where} into {entry} (SHA-256 verified)")
    return entry


def _entry_matches(entry: Path, sha256: str) -> bool:
    weights = entry / "model.safetensors"
    return weights.is_file() and (entry / "meta.json").is_file() and file_digest(weights) == sha256


def _download(record: dict[str, Any], tmp: Path, tracker: tracking.Tracker) -> tuple[Path | None, str, list[str]]:
    """(folder holding the teacher files, where they came from, errors of the sources that failed)."""
    errors: list[str] = []
    if record.get("run_id"):
        own = [tracker.tracking_uri] if tracker.tracking_uri else []  # this worker's store first
        for uri in dict.fromkeys([*own, record["tracking_uri"]]):
            try:
                reader = tracker if uri == tracker.tracking_uri else tracking.artifact_reader(uri)
                local = reader.download_artifacts(record["run_id"], record["artifact_path"], tmp)
            except Exception as exc:  # noqa: BLE001 - try the next source
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                errors.append(f"MLflow {uri}: {exc.__class__.__name__}: {first}")
                continue
            if local is not None and all((local / name).is_file() for name in TEACHER_FILES):
                return local, f"MLflow run {record['run_id']} ({uri})", errors
            errors.append(f"MLflow {uri}: run {record['run_id']} has no {record['artifact_path']}/ artifacts")
    path = Path(record["path"])
    if all((path / name).is_file() for name in TEACHER_FILES):
        copy = tmp / "from-path"
        copy.mkdir()
        for name in TEACHER_FILES:
            shutil.copyfile(path / name, copy / name)
        return copy, str(path), errors
    errors.append(f"{path} does not exist on this machine")
    return None, "", errors


def fetch_trial_checkpoints(study: optuna.Study, trials_dir: Path, numbers: list[int]) -> list[int]:
    """Download the checkpoints of trials ``numbers`` that this machine lacks from their MLflow runs.

    Each worker saves its students locally and logs them to its trial's MLflow run (artifacts `student/`); the
    report (test accuracy of the front) and `autokd export` on another machine take them from there, with the
    MLflow server and parent run the study recorded. With none (``--no-mlflow``), or when MLflow cannot be
    reached, nothing is fetched (a warning says why) and the caller reports what is missing. Returns the trial
    numbers fetched.
    """
    tracking_uri = study.user_attrs.get(MLFLOW_TRACKING_URI_ATTR)
    parent_run_id = study.user_attrs.get(MLFLOW_PARENT_RUN_ATTR)
    missing = [n for n in numbers if not (Path(trials_dir) / str(n) / WEIGHTS_FILE).is_file()]
    if not missing or not tracking_uri or not parent_run_id:
        return []
    reader = tracking.artifact_reader(tracking_uri)
    fetched: list[int] = []
    try:
        for number in missing:
            run_id = reader.finished_trial_run(parent_run_id, number)
            if run_id is None:
                continue
            out = Path(trials_dir) / str(number)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".fetch-{number}-"))
            try:
                local = reader.download_artifacts(run_id, "student", tmp)
                if local is None:
                    continue
                out.mkdir(exist_ok=True)
                for f in sorted(local.iterdir(), key=lambda f: f.name == WEIGHTS_FILE):
                    os.replace(f, out / f.name)  # the weights last: their presence marks a complete checkpoint
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            fetched.append(number)
    except Exception as exc:  # noqa: BLE001 - the caller then names what is missing
        logger.warning(f"warning: could not fetch checkpoints from MLflow {tracking_uri} "
                       f"({exc.__class__.__name__}: {exc})")
    if fetched:
        logger.info(f"fetched the checkpoint(s) of trial(s) {', '.join(map(str, fetched))} from MLflow (trained on "
                    "another machine, or removed here)")
    return fetched


# ---------------------------------------------------------------------------------------------------------
# comparable latencies
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# commands for N machines
# ---------------------------------------------------------------------------------------------------------

def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def worker_commands(machines: int, storage: str | None, tracking_uri: str | None, study: str, budget: int,
                    jobs: int = 1, extra: list[str] | None = None, artifacts: str = "/srv/mlflow-artifacts") -> str:
    """The shell recipe to run one study on `machines` machines: databases, MLflow server, one line per machine."""
    if machines < 1 or jobs < 1 or budget < 1:
        raise UserError(f"--machines {machines}, --jobs {jobs}, --budget {budget}: each must be at least 1")
    storage = storage or "postgresql://USER@DBHOST/autokd"
    if not storage.startswith(("postgresql://", "postgresql+psycopg2://")):
        raise UserError(f"--storage {storage!r}: workers on several machines share the study through PostgreSQL; "
                        "give postgresql://USER@HOST[:PORT]/DB (a .journal file or SQLite works on one machine only)")
    tracking_uri = tracking_uri or "http://MLFLOW_HOST:5000"
    if not tracking_uri.startswith(("http://", "https://")):
        raise UserError(f"--tracking-uri {tracking_uri!r}: other machines cannot reach a local MLflow store; give "
                        "the http://HOST:PORT of an `mlflow server`")
    parts = urlsplit(storage.replace("postgresql+psycopg2://", "postgresql://"))
    db = parts.path.lstrip("/") or "autokd"
    user = parts.username or "USER"
    host = parts.netloc.rsplit("@", 1)[-1].rsplit(":", 1)[0] or "DBHOST"  # .hostname would lower-case it
    port = ["-p", str(parts.port)] if parts.port else []
    mlflow_db = _with_database(storage.replace("postgresql+psycopg2://", "postgresql://"), "mlflow")
    tport = urlsplit(tracking_uri).port or 5000
    search = ["autokd", "search", "--storage", storage, "--tracking-uri", tracking_uri, "--study", study,
              "--budget", str(budget), *(["--jobs", str(jobs)] if jobs > 1 else []), *(extra or [])]
    lines = [
        "# 1. Once, on the PostgreSQL server: a database for the Optuna study and one for MLflow",
        shlex.join(["createdb", "-h", host, *port, "-U", user, db]),
        shlex.join(["createdb", "-h", host, *port, "-U", user, "mlflow"]),
        "# 2. Once, on the MLflow machine (pip install mlflow psycopg2-binary): the tracking server, runs in "
        "PostgreSQL, artifacts proxied to a folder; no authentication, so keep the port on a private network",
        shlex.join(["mlflow", "server", "--host", "0.0.0.0", "--port", str(tport), "--backend-store-uri", mlflow_db,
                    "--artifacts-destination", artifacts]),
        f"# 3. One line per machine, in any order ({machines} machine(s) x {jobs} worker(s)): the first worker "
        "creates the study, trains the teacher and publishes it to MLflow;",
        "#    the others wait, download it and join. Together they finish exactly "
        f"{budget} trials; the trial of a worker that dies is failed after its heartbeats stop and retried.",
        "#    Use one kind of machine: latency is measured on each worker, and a worker on other hardware is refused.",
    ]
    for i in range(1, machines + 1):
        lines.append(f"{shlex.join(search)}  # machine {i}")
    lines.append("# 4. The last worker to finish writes the report (front checkpoints fetched from MLflow) to its "
                 "studies/<study>/report/ and the MLflow parent run; rebuild it there with: "
                 f"autokd report --storage {shlex.quote(storage)} --study {shlex.quote(study)}")
    return "\n".join(lines)

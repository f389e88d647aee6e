"""`autokd search` for one worker: prepare the search (inputs, study, teacher, parent run), start this machine's
other workers (`autokd.search.processes`), run trials to the budget (`autokd.search.worker_loop`), write the report.

The first worker prepares everything shared (the teacher, its outputs cache, the study, the MLflow parent run)
before it starts the others. Workers started on other machines against one PostgreSQL storage wait for the
first on the study lock, then join (see `autokd.study.scaleout`).
"""
from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import optuna
import torch

from autokd._version import __version__
from autokd.config import SAMPLERS, LatencySettings, SearchSettings
from autokd.errors import FatalSearchError, Interrupted, UserError, close_matches
from autokd.latency import pinning
from autokd.latency.remote.server import TOKEN_ENV
from autokd.search import processes
from autokd.study import record, scaleout
from autokd.study.record import (
    MLFLOW_PARENT_RUN_ATTR,
    MLFLOW_TRACKING_URI_ATTR,
    REPORT_FOR_FINISHED_ATTR,
    TEACHER_ATTR,
    TEACHER_VAL_ACC_ATTR,
    WORKERS_STARTED_ATTR,
    recorded_states,
)
from autokd.study.store import (
    budget_used,
    heartbeat_settings,
    make_sampler,
    make_storage,
    open_study,
    storage_url,
    study_dir,
    study_lock,
    worker_host,
)
from autokd.tracking import Tracker
from autokd.utils import devices

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

    from autokd.latency.meter import LatencyMeter, MeasureLock
    from autokd.model.data import DataSplits
    from autokd.search.objective import TrialContext, TrialOutcome
    from autokd.search.worker_loop import OnTrial
    from autokd.utils.locks import CpuGate

logger = logging.getLogger(__name__)


@dataclass
class SearchSummary:
    """What a worker did, for the CLI's last lines and for tests/benchmarks."""

    study_name: str
    study_dir: Path
    outcomes: list[TrialOutcome] = field(default_factory=list)
    seconds: float = 0.0
    finished_in_study: int = 0
    budget: int = 0
    report_files: list[Path] = field(default_factory=list)
    completed_in_study: int = 0  # none: nothing to report or export, the CLI exits 1
    not_completed: dict[str, int] = field(default_factory=dict)  # "STATE: reason" -> trials of the study


@dataclass
class PreparedSearch:
    """What a worker has before its first trial: the study, this machine's workers, and what every trial uses
    (settings, data, teacher outputs, latency meter, tracker, the study's MLflow parent run)."""

    name: str
    study_dir: Path
    study: optuna.Study
    workers: list[devices.WorkerSlot]  # this machine's workers, this one first (none in a spawned worker)
    shared: bool  # a storage several machines share
    context: TrialContext


def default_study_name(dataset: str, space_name: str) -> str:
    """`<dataset>-<space>`, filesystem-safe (folder datasets use the folder's name)."""
    base = dataset.split(":", 1)[1].rstrip("/").split("/")[-1] if dataset.startswith("folder:") else dataset
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in f"{base}-{space_name}")
    return safe.strip("-") or "study"


def validate_settings(s: SearchSettings) -> None:
    """Check the flags that need no file or model, before anything heavy happens."""
    if s.budget < 1:
        raise UserError(f"--budget {s.budget}: must be at least 1")
    if s.sampler not in SAMPLERS:
        raise UserError(f"--sampler {s.sampler!r}: unknown; valid: {', '.join(SAMPLERS)}")
    if s.jobs < 1:
        raise UserError(f"--jobs {s.jobs}: must be at least 1")
    if s.epochs is not None and s.epochs < 1:
        raise UserError(f"--epochs {s.epochs}: must be at least 1")
    if s.max_latency_ms is not None and not s.max_latency_ms > 0:
        raise UserError(f"--max-latency-ms {s.max_latency_ms}: must be a positive number of milliseconds")
    if s.study is not None and (not s.study or not all(ch.isalnum() or ch in "-_." for ch in s.study)):
        raise UserError(f"--study {s.study!r}: use letters, digits, '-', '_' or '.'")
    if s.jobs_per_device < 1:
        raise UserError(f"--jobs-per-device {s.jobs_per_device}: must be at least 1")
    from autokd.latency.quantize import validate_latency_precision

    validate_latency_precision(s.latency_precision)


def local_workers(s: SearchSettings, device: str) -> list[devices.WorkerSlot]:
    """The workers of this machine: `--jobs N` on the CPU (or one explicit `cuda:N`), else one per chosen GPU
    and slot (`--devices`, default all visible; `--jobs-per-device`, default 1). Bad values are UserErrors."""
    w = s.workers
    if device != "cuda":
        if w.devices is not None or w.jobs_per_device > 1:
            flag = "--devices" if w.devices is not None else "--jobs-per-device"
            if device == "cpu":
                raise UserError(f"{flag} places workers on GPUs, but this search trains on the CPU (--device "
                                f"{s.device}); on the CPU use --jobs N")
            raise UserError(f"{flag} places workers on GPUs, but --device {s.device} names one GPU; use --device "
                            "cuda with --devices N[,M...] (and --jobs-per-device K) instead")
        return devices.cpu_workers(w.jobs)
    if w.jobs > 1:
        raise UserError(f"--jobs {w.jobs}: on GPUs a search runs --jobs-per-device K workers on each device of "
                        "--devices (default: all visible GPUs); use --jobs-per-device instead, or --device cpu "
                        "for CPU workers")
    visible, names = devices.visible_devices()
    chosen = devices.parse_devices(w.devices or "all", visible, names)
    return devices.plan_workers(visible, chosen, w.jobs_per_device)


def validate_teacher_args(arch: str | None, checkpoint: str | None) -> None:
    """Fail fast on a teacher name timm does not know or a checkpoint path that does not exist."""
    import timm

    if arch is not None and not timm.is_model(arch):
        close = close_matches(arch, timm.list_models(), n=3)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise UserError(f"--teacher {arch!r}: not a timm model name{hint} (list them with timm.list_models())")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"--teacher-checkpoint {checkpoint}: file not found (give a local .safetensors or .pt file)")


def check_latency_device_for_workers(latency_device: str | None, workers: list[devices.WorkerSlot]) -> None:
    """Refuse ``--latency-device cuda:N`` with several GPU workers: each spawned worker sees only its own GPU
    (``CUDA_VISIBLE_DEVICES``), where ``cuda:N`` would name another device or none."""
    gpu_workers = [w for w in workers if w.device_index is not None]
    if len(gpu_workers) > 1 and latency_device and latency_device.startswith("cuda:"):
        raise UserError(f"--latency-device {latency_device} cannot be used with several GPU workers (each sees only "
                        "its own GPU): use --latency-device cuda (each worker times on its own GPU), --latency-device "
                        "cpu, or --devices with one GPU")


#: Strides of `_resumed_seed`. Any values would do that keep its terms from cancelling each other out; distinct
#: primes, far apart and above any worker index, do.
_TRIALS_SEED_STRIDE = 7919
_JOINS_SEED_STRIDE = 104729


def _resumed_seed(seed: int, worker_index: int, trials: int, joined: int) -> int:
    """The sampler seed of a worker that resumes or joins a study: ``seed`` moved by its worker index, by the
    study's trial count and by the number of workers that joined before it.

    Workers of one machine differ in their index; workers on other machines (all index 0) in the trial or join
    count they see. With the same index, two such counts give one seed only if the trial counts differ by a
    multiple of the join stride (both strides being prime), which no study reaches.
    """
    return seed + worker_index + _TRIALS_SEED_STRIDE * trials + _JOINS_SEED_STRIDE * joined


def prepare_search(s: SearchSettings, worker_index: int = 0) -> PreparedSearch:
    """Check the inputs, then open (or create) the study, get the teacher and its outputs and the parent run.

    Every input error is a UserError raised before any study or training exists. The study lock is held while
    the first worker trains the teacher: the others wait for it, then load (or, across machines, fetch) it.
    """
    from autokd.model.data import TrainViews, load_dataset
    from autokd.model.space import load_space
    from autokd.model.teacher import get_teacher, teacher_outputs
    from autokd.search.objective import TrialContext
    from autokd.tracking import make_tracker

    validate_settings(s)
    validate_teacher_args(s.teacher, s.teacher_checkpoint)
    space = load_space(s.space)  # all input errors surface here, before any study or training exists
    device = devices.resolve_device(s.device)
    # Spawned workers are told the total (s.jobs) and, on GPUs, see only their own device.
    workers = local_workers(s, device) if worker_index == 0 else []
    check_latency_device_for_workers(s.latency.device, workers)
    if workers and workers[0].device_index is not None:
        device = workers[0].device
        torch.cuda.set_device(workers[0].device_index)  # so that a plain `cuda` (e.g. --latency-device) is it too
    d = s.data
    data = load_dataset(d.dataset, data_dir=d.data_dir, input_size=d.input_size or space.input_size, seed=0,
                        download=d.download, train_limit=d.train_limit)
    root = Path(s.root)
    train_gate, measure_gate = _gates(root / ".locks", device, s.latency.device or device)
    # Built before the storage: a bad latency setting (e.g. int8 with torch) leaves no file behind.
    meter = make_latency_meter(s.latency, device, root, measure_gate.measuring, families=list(space.students))
    name = s.study or default_study_name(d.dataset, space.name)
    sdir = study_dir(root, name)
    storage = make_storage(s.storage, root)
    pinned = {record.SPACE_FINGERPRINT_ATTR: space.fingerprint, record.DATASET_ATTR: data.name,
              record.DATA_FINGERPRINT_ATTR: data.fingerprint, record.EPOCHS_ATTR: s.epochs or space.epochs}
    extra_attrs = {record.SPACE_ATTR: space.canonical(), record.SPACE_PATH_ATTR: str(s.space),
                   record.VERSION_ATTR: __version__, record.BUDGET_ATTR: s.budget, record.DEVICE_ATTR: device,
                   record.INPUT_SIZE_ATTR: data.input_size, record.TRAIN_LIMIT_ATTR: d.train_limit,
                   record.DATA_DIR_ATTR: d.data_dir, record.VAL_IMAGES_ATTR: len(data.y_val)}
    sampler = make_sampler(s.sampler, s.seed + worker_index)
    shared = scaleout.is_shared_storage(s.storage)
    teacher_kwargs = dict(arch=s.teacher, cache_root=root / "teachers", device=device, pretrained=s.teacher_pretrained)
    teacher = None
    if s.teacher_checkpoint is not None:
        # The teacher is input too (a truncated or wrong checkpoint is exit 2): load it before any study exists.
        teacher = get_teacher(data, checkpoint=s.teacher_checkpoint, **teacher_kwargs)
    tracker = make_tracker(s.tracking.uri, s.tracking.mlflow, root, experiment_name=name)
    parent_run_id: str | None = None
    try:
        with study_lock(s.storage, root, name):
            # Held while the first worker trains the teacher: the others wait here, then fetch it and join.
            study = _existing_study(name, storage, sampler)
            created = study is None
            if study is not None:
                study, _ = open_study(name, storage, pinned, extra_attrs, sampler)  # checks space/data pins
            if teacher is None:
                if study is not None and shared:
                    scaleout.fetch_teacher(study, root / "teachers", tracker)
                teacher = get_teacher(data, **teacher_kwargs)
            if study is None:  # created only once the teacher is ready: a teacher that fails leaves no study
                study, created = open_study(name, storage, pinned, extra_attrs, sampler)
            teacher_id = f"{teacher.arch}@{teacher.fingerprint}"
            stored_teacher = study.user_attrs.get(TEACHER_ATTR)
            if stored_teacher is None:
                study.set_user_attr(TEACHER_ATTR, teacher_id)
                study.set_user_attr(TEACHER_VAL_ACC_ATTR, teacher.val_acc)
            elif stored_teacher != teacher_id:
                raise UserError(f"study {name!r} was created with teacher {stored_teacher}, now {teacher_id}; resume "
                                "with the same --teacher/--teacher-checkpoint or start a new study with --study NEW_NAME")
            pinning.check_latency_device(study, meter.signature(), s.latency.batch, s.latency.allow_mixed,
                                          settings={**meter.signature_info(), "torch_device": meter.dev.type})
            parent_run_id = _parent_run(study, tracker, s, name, teacher_id, shared)
            if shared and s.teacher_checkpoint is None and teacher.path is not None:
                scaleout.publish_teacher(study, teacher.path, teacher.arch, tracker, parent_run_id, worker_host())
            joined = int(study.user_attrs.get(WORKERS_STARTED_ATTR, 0))
            study.set_user_attr(WORKERS_STARTED_ATTR, joined + 1)
        if worker_index == 0:
            logger.info(f"study {name!r} ({'new' if created else 'resumed'}) — files under {sdir}/, "
                        f"storage {storage_url(s.storage, root)}")
        if created is False:
            # A resumed or joined study's sampler must not replay the draws of another worker with the same seed
            # (workers on other machines all have worker index 0): the join count makes each worker's seed its own.
            study.sampler = make_sampler(s.sampler, _resumed_seed(s.seed, worker_index, len(study.trials), joined))

        views = TrainViews(num_views=space.views, seed=0)
        outputs = (teacher_outputs(teacher, data, views, cache_root=root / "teachers", device=device,
                                   need_features=space.uses_features()) if space.uses_teacher() else None)
        context = TrialContext(
            settings=s, space=space, data=data.to(device), teacher_outputs=outputs, teacher_arch=teacher.arch,
            views=views,
            latency=(pinning.StudyLatency(study, meter, lock=lambda: study_lock(s.storage, root, name)) if shared
                     else meter),
            tracker=tracker, parent_run_id=parent_run_id,
            trials_dir=sdir / "trials", device=device, train_lock=train_gate.training)
    except BaseException as exc:
        if parent_run_id:  # started or resumed above: a search that stops before its trials does not leave it RUNNING
            _end_parent(study, tracker, parent_run_id, s, _parent_end_status(exc))
        raise
    return PreparedSearch(name=name, study_dir=sdir, study=study, workers=workers, shared=shared, context=context)


def run_search(s: SearchSettings, worker_index: int = 0, on_trial: OnTrial | None = None) -> SearchSummary:
    """Run (or resume, or top up) a study until it holds `s.budget` finished trials.

    Worker 0 (the default) plans this machine's workers (`s.jobs` on the CPU; on GPUs `s.devices` x
    `s.jobs_per_device`) and starts the others with the same settings; worker ``worker_index`` > 0 is one of
    those, with `s.jobs` the total. ``on_trial(outcome, progress)`` is called after each trial of this worker
    (the CLI prints its progress line there); the other messages are logged under ``autokd.search``.
    """
    from autokd.search.worker_loop import run_trials
    from autokd.tracking import spool_dir

    p = prepare_search(s, worker_index)
    root = Path(s.root)
    total_workers = len(p.workers) if worker_index == 0 else s.workers.jobs
    children = processes.spawn_workers(s, p.workers[1:], total_workers) if worker_index == 0 else []
    torch.set_num_threads(processes.train_threads(total_workers))
    ctx = p.context
    gpu = devices.physical_id(ctx.device) if ctx.device.startswith("cuda") else None
    if total_workers > 1:
        logger.info(f"worker {worker_index} of {total_workers}: {torch.get_num_threads()} training thread(s)"
                    + (f", GPU {gpu}" if gpu is not None else ""))
    summary = SearchSummary(study_name=p.name, study_dir=p.study_dir, budget=s.budget)
    study, tracker, parent_run_id = p.study, ctx.tracker, ctx.parent_run_id
    parent_status = "FINISHED"  # how the parent run ends; whatever stops the search, it is not left RUNNING
    try:
        with processes.sigterm_interrupts():
            # Everything built so far (torch, timm, MLflow, data, teacher) lives for the whole search: freezing it
            # keeps the per-trial gc.collect (which releases the last trial's model and graphs) from rescanning it.
            gc.freeze()
            started = time.perf_counter()
            try:
                summary.outcomes = run_trials(
                    study, ctx, s.budget, lambda: study_lock(s.storage, root, p.name),
                    heartbeat_interval=heartbeat_settings()[0] if p.shared else 0, gpu=gpu, on_trial=on_trial)
            finally:
                summary.seconds = time.perf_counter() - started
                gc.unfreeze()  # a caller that goes on (tests, notebooks) gets its objects collectable again
                for child in children:
                    processes.wait_worker(child)
                tracker.flush()  # trial runs end without waiting for MLflow: everything is written before we go on
                if parent_run_id:
                    tracker.close_stale_runs(parent_run_id, recorded_states(study))
        summary.finished_in_study = budget_used(study)
        trials = study.get_trials(deepcopy=False)
        summary.completed_in_study = sum(1 for t in trials if t.state == optuna.trial.TrialState.COMPLETE)
        summary.not_completed = record.not_completed_reasons(trials)
        if worker_index == 0:
            summary.report_files = _final_report(study, s, ctx.data, tracker, parent_run_id)
    except BaseException as exc:
        parent_status = _parent_end_status(exc)
        raise
    finally:
        if parent_run_id:
            _end_parent(study, tracker, parent_run_id, s, parent_status)
    if tracker.spooling:
        logger.info(f"MLflow at {tracker.tracking_uri} does not answer: its calls are kept under "
                    f"{spool_dir(root, p.name)}/ and sent at the next start, or with `autokd sync-mlflow --study "
                    f"{p.name}`")
    return summary


def _parent_end_status(exc: BaseException) -> str:
    """How the parent run ends when the search stops with ``exc``: KILLED when it was stopped (a signal, Ctrl-C,
    repeated failed trials), FAILED on anything else (a storage that cannot be read, a full disk, a bug)."""
    return "KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt, FatalSearchError)) else "FAILED"


def _end_parent(study: optuna.Study, tracker: Tracker, parent_run_id: str, s: SearchSettings, status: str) -> None:
    """End the study's MLflow parent run, unless a trial still runs in another worker (which then ends it).

    When the study cannot be read (the error the search stops with), it is ended anyway: left RUNNING, nothing
    would ever end it.
    """
    with study_lock(s.storage, Path(s.root), study.study_name):
        try:
            running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        except Exception:  # noqa: BLE001 - any storage error; the caller raises its own
            running = []
        if running:
            return
        tracker.end_parent(parent_run_id, status)


def _claim_report(study: optuna.Study, s: SearchSettings, root: Path) -> bool:
    """Several machines finish together; only one of them writes the report of the same finished trials."""
    with study_lock(s.storage, root, study.study_name):
        done = sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())
        if study.user_attrs.get(REPORT_FOR_FINISHED_ATTR) == done:
            return False
        study.set_user_attr(REPORT_FOR_FINISHED_ATTR, done)
        return True


def _existing_study(name: str, storage: BaseStorage, sampler: optuna.samplers.BaseSampler) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        return None


def _parent_run(study: optuna.Study, tracker: Tracker, s: SearchSettings, name: str, teacher_id: str,
                shared: bool) -> str | None:
    """The study's MLflow parent run, created by its first worker. Call under the study lock."""
    if not tracker.enabled:
        return None
    run_id = study.user_attrs.get(MLFLOW_PARENT_RUN_ATTR)
    if run_id and tracker.parent_run_exists(run_id):
        tracker.resume_parent(run_id)  # RUNNING while this search runs (also takes over a killed worker's)
        return run_id
    stored_uri = study.user_attrs.get(MLFLOW_TRACKING_URI_ATTR)
    if run_id and shared:
        # Another worker logs this study to another MLflow store: a second parent would split its runs.
        raise UserError(f"study {name!r} logs to MLflow run {run_id} at {stored_uri}, which the tracking store of "
                        f"this worker ({tracker.tracking_uri}) does not have; start every worker with "
                        f"--tracking-uri {stored_uri} (or --no-mlflow)")
    run_id = tracker.create_parent_run(name, {"autokd.teacher": teacher_id}, {
        "dataset": s.data.dataset, "space": str(s.space), "budget": s.budget, "sampler": s.sampler, "seed": s.seed,
        "teacher": teacher_id})
    study.set_user_attr(MLFLOW_PARENT_RUN_ATTR, run_id)
    study.set_user_attr(MLFLOW_TRACKING_URI_ATTR, tracker.tracking_uri)
    return run_id


def make_latency_meter(latency: LatencySettings, device: str, root: Path, lock: MeasureLock,
                       families: Sequence[str] | None = None) -> LatencyMeter:
    """The search's latency meter, built whole: runtime and device (``--latency-device``, else the training
    ``device``; or the `autokd latency-server` of ``--latency-target``), the cache under ``root`` and the lock that
    keeps this machine's trainers out while it measures; ``families``: the space's, the anchors timed beside
    students (`autokd.latency.anchors`). Bad settings, and a target that does not answer, are UserErrors."""
    from autokd.latency.meter import LatencyCache, LatencyMeter

    target = None
    if latency.target is not None:
        if latency.device is not None:
            raise UserError("--latency-device and --latency-target both say where latency is measured: give one")
        from autokd.latency.remote.client import RemoteTarget, backoff_delays

        target = RemoteTarget(latency.target, latency.token, retry_delays_s=backoff_delays(latency.target_retry_s))
    elif latency.token is not None and latency.token != os.environ.get(TOKEN_ENV):
        raise UserError("--latency-token is only used with --latency-target URL")
    return LatencyMeter(latency.runtime, latency.device or device, latency.threads, latency.batch,
                        cache=LatencyCache(root / "latency_cache"), lock=lock, precision=latency.precision,
                        target=target, anchor_families=families)


def _gates(lock_dir: Path, device: str, latency_device: str) -> tuple[CpuGate, CpuGate]:
    """(gate trainers hold, gate a latency measurement takes). Latency on the CPU: one machine-wide gate, as
    training on any device uses the CPU too. Training and latency both on GPUs: one gate per GPU, so that a
    measurement stops only the workers training on the GPU it measures on."""
    from autokd.utils.locks import CpuGate

    if device.startswith("cuda") and latency_device.startswith("cuda"):
        def name(dev: str) -> str:
            return "cuda-" + "".join(ch if ch.isalnum() else "-" for ch in devices.physical_id(dev))

        return CpuGate(lock_dir, name=name(device)), CpuGate(lock_dir, name=name(latency_device))
    gate = CpuGate(lock_dir)
    return gate, gate


def _final_report(study: optuna.Study, s: SearchSettings, data: DataSplits, tracker: Tracker,
                  parent_run_id: str | None) -> list[Path]:
    from autokd.report.build import build_report

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if running:
        logger.info(f"{len(running)} trial(s) still running in other workers; run `autokd report --study "
                    f"{study.study_name}` when they finish")
        return []
    root = Path(s.root)
    if scaleout.is_shared_storage(s.storage):
        if not _claim_report(study, s, root):
            logger.info(f"study {study.study_name!r}: another worker writes the report")
            return []
        try:
            result = build_report(study, root, data=data, max_latency_ms=s.max_latency_ms, tracker=tracker,
                                  parent_run_id=parent_run_id)
        except UserError as exc:  # the trials are done; a report can be made later where the checkpoints are
            logger.warning(f"warning: no report: {exc}")
            return []
        return result.files if result else []
    result = build_report(study, root, data=data, max_latency_ms=s.max_latency_ms, tracker=tracker,
                          parent_run_id=parent_run_id)
    return result.files if result else []

"""Glue for one trial: sampled params -> student -> measured latency -> distillation with pruning -> values.

Everything a trial needs that is shared across trials (the settings, data, teacher outputs, latency meter,
tracker) lives in a `TrialContext` built once per worker. `run_trial` never lets an exception escape except an
interrupt or a fatal storage error: every other failure becomes a FAIL with its reason, so the study goes on.
"""
from __future__ import annotations

import contextlib
import gc
import math
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import optuna
import torch

from autokd.config import SearchSettings
from autokd.errors import FatalSearchError, Interrupted
from autokd.latency.meter import LatencyMeter, LatencyResult
from autokd.latency.pinning import StudyLatency
from autokd.model.checkpoint import write_checkpoint
from autokd.model.data import DataSplits, TrainViews
from autokd.model.losses import build_loss
from autokd.model.space import SearchSpace, TrialParams, sample
from autokd.model.students import StudentSpec, build_from_spec, resolve_student
from autokd.model.teacher import TeacherOutputs
from autokd.model.train import EpochResult, NonFiniteLossError, TrainConfig, distill
from autokd.search.trial_latency import PROBE_EVERY_S, TrialLatency
from autokd.select import pruning
from autokd.study import record as trials
from autokd.study.record import State
from autokd.tracking import Tracker, TrialRun

if TYPE_CHECKING:
    from autokd.utils.locks import TrainingHold


@dataclass
class TrialOutcome:
    """What happened to one trial, for the progress line and the tell."""

    number: int
    state: State  # a terminal state
    params: TrialParams | None = None
    val_acc: float | None = None
    latency_ms: float | None = None
    epochs_trained: int = 0
    reason: str | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


class Stopwatch:
    """Where a trial's time goes: ``with watch.section("train_s"):`` adds the block's seconds to ``times["train_s"]``.

    A section leaves out the sections run inside it (each counts once, in the innermost), so the figures add up:
    MLflow calls made while training are ``tracking_s``, not ``train_s``. ``elapsed()`` is the time since the watch
    started, every section included.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.times: dict[str, float] = {}
        self._inner: list[float] = []  # for each open section, the seconds of the sections inside it so far

    def elapsed(self) -> float:
        """Seconds since the watch started."""
        return time.perf_counter() - self.started

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Time the block into ``times[name]`` (added to what is there), less its inner sections; also when the
        block raises (a pruned trial leaves training from inside an epoch's bookkeeping)."""
        t0 = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            inner = self._inner.pop()
            if self._inner:
                self._inner[-1] += seconds
            self.times[name] = self.times.get(name, 0.0) + seconds - inner


@dataclass
class TrialContext:
    """What every trial of one worker uses: the search's settings (latency limit, epochs, pruning, seed, compile)
    and what the worker prepared once for all its trials."""

    settings: SearchSettings
    space: SearchSpace
    data: DataSplits  # on ``device``
    teacher_outputs: TeacherOutputs | None  # None when no loss of the space uses the teacher
    teacher_arch: str
    views: TrainViews
    latency: LatencyMeter | StudyLatency  # runtime, cache and measuring lock (+ the study's figures when shared)
    tracker: Tracker
    parent_run_id: str | None
    trials_dir: Path
    device: str  # what this worker trains on (``settings.device`` resolved, or its GPU)
    train_lock: Callable[[], contextlib.AbstractContextManager[TrainingHold]] | None = None  # held while training


def _save_checkpoint(model: torch.nn.Module, spec: StudentSpec, params: TrialParams, meta: dict[str, Any],
                     out_dir: Path) -> None:
    """Write the trial's student (weights + rebuild config) atomically: a crash never leaves a torn file."""
    write_checkpoint(model, {"student": spec.to_dict(), "params": params.flat(), **meta}, out_dir)


def run_trial(study: optuna.Study, trial: optuna.Trial, ctx: TrialContext) -> TrialOutcome:
    """Run one trial end to end and tell the study its result.

    ``outcome.seconds`` is the whole trial; ``outcome.timings`` splits it into ``sample_s``, ``build_s``,
    ``latency_s``, ``tracking_s`` (every MLflow call), ``train_s``, ``epoch_bookkeeping_s`` and ``save_s``.
    """
    watch = Stopwatch()
    outcome = TrialOutcome(number=trial.number, state=State.FAIL)
    run = None
    student = None
    tracked: TrialLatency | None = None
    try:
        with watch.section("sample_s"):
            params = sample(ctx.space, trial, ctx.settings.epochs)
            outcome.params = params
            spec = resolve_student(params.family, params.width, params.depth, num_classes=ctx.data.num_classes,
                                   in_chans=ctx.data.in_chans, input_size=ctx.data.input_size)
            # One storage write for all sampled values (a journal append each): read back with sampled_params().
            trial.set_user_attr(trials.PARAMS_ATTR, params.flat())
            trial.set_user_attr(trials.ARCH_KEY_ATTR, spec.key)
            trial.set_user_attr(trials.TIMM_ATTR, {"model_name": spec.model_name, "kwargs": spec.kwargs})

        # The student is built once, before its latency is measured, and the same module is then trained. Its
        # initial weights come from the trial's seed, not from whatever this process drew before (earlier
        # trials, latency inputs): the same command gives the same trials, also in-process and after a resume.
        with watch.section("build_s"):
            torch.manual_seed(ctx.settings.seed + trial.number)
            student = build_from_spec(spec)

        tracked = TrialLatency(ctx.latency, spec)
        with watch.section("latency_s"):
            latency = tracked.measure(student)
        outcome.latency_ms = latency.median_ms
        _record_latency(trial, tracked)

        with watch.section("tracking_s"):
            run = ctx.tracker.start_trial(ctx.parent_run_id, trial.number, _run_params(params, spec, ctx),
                                          {"autokd.arch_key": spec.key, "autokd.family": params.family,
                                           "autokd.loss": params.loss, "autokd.teacher": ctx.teacher_arch})
        run = _TimedRun(run, watch)
        _log_latency(run, latency, {"params": float(latency.params), "macs": float(latency.macs)})

        max_latency_ms = ctx.settings.max_latency_ms
        if max_latency_ms is not None and latency.median_ms > max_latency_ms and not tracked.settled:
            with watch.section("latency_s"):  # infeasible is final: not on a provisional figure
                tracked.settle()
            latency = tracked.result
            outcome.latency_ms = latency.median_ms
            _record_latency(trial, tracked)
        if max_latency_ms is not None and latency.median_ms > max_latency_ms:
            outcome.state = State.INFEASIBLE
            outcome.reason = f"latency {latency.median_ms:.3f} ms > --max-latency-ms {max_latency_ms}"
            trials.finish(study, trial, State.INFEASIBLE, reason=outcome.reason, run=run)
            return outcome

        outcome = _train(study, trial, ctx, params, spec, student, tracked, run, outcome, watch)
        return outcome
    except optuna.TrialPruned:
        outcome.state = State.PRUNED
        if tracked is not None and tracked.refinements:  # the figure as refined until the rung (the rung's own is
            _record_latency(trial, tracked)              # in its record)
            if run is not None:
                _log_latency(run, tracked.result)
        trials.finish(study, trial, State.PRUNED, reason=outcome.reason, run=run)
        return outcome
    except (KeyboardInterrupt, Interrupted):
        outcome.state = State.INTERRUPTED
        # Not the trial's fault: the same command resumes the study and runs these parameters again.
        trials.finish(study, trial, State.INTERRUPTED, reason="interrupted (Ctrl-C / SIGTERM)", requeue=True, run=run,
                      run_reason="interrupted")
        raise
    except FatalSearchError as exc:
        # e.g. a full disk: retried once it is fixed
        trials.finish(study, trial, State.FAIL, reason=str(exc), requeue=True, run=run)
        raise
    except Exception as exc:  # noqa: BLE001 - a trial's failure must not end the study
        outcome.reason = _failure_reason(exc)
        trials.finish(study, trial, State.FAIL, reason=outcome.reason, traceback=traceback.format_exc(), run=run)
        return outcome
    finally:
        if tracked is not None:
            tracked.close()
        outcome.seconds = watch.elapsed()
        outcome.timings = watch.times
        student = None  # drop this frame's reference before the collection (and the CUDA allocator's purge)
        _release_memory(ctx.device)


class _TimedRun:
    """A trial's tracker run that times every call as the ``tracking_s`` section of the trial's stopwatch.

    So ``tracking_s`` is everything MLflow costs a trial (epoch logging, artifacts and the final status
    included), and the sections the calls are made in (``epoch_bookkeeping_s``, ``save_s``) leave it out.
    """

    def __init__(self, run: TrialRun, watch: Stopwatch) -> None:
        self._run = run
        self._watch = watch

    @property
    def run_id(self) -> str:
        return self._run.run_id

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._run, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self._watch.section("tracking_s"):
                return method(*args, **kwargs)

        return timed


def _record_latency(trial: optuna.Trial, tracked: TrialLatency) -> None:
    """The trial's latency figure now (refined figures replace it), with how it was obtained."""
    assert tracked.result is not None
    trial.set_user_attr(trials.LATENCY_ATTR, {**tracked.result.to_dict(), "cache_hit": tracked.cache_hit,
                                              "refinements": tracked.refinements})


def _log_latency(run: TrialRun, latency: LatencyResult, extra: dict[str, float] | None = None) -> None:
    """The trial's latency figure and its interval in its MLflow run (again when refined: the last one counts)."""
    low, high = latency.interval
    run.log_metrics({"latency_ms": latency.median_ms, "latency_iqr_ms": latency.iqr_ms, "latency_low_ms": low,
                     "latency_high_ms": high, **(extra or {})})


def _run_params(params: TrialParams, spec: StudentSpec, ctx: TrialContext) -> dict[str, Any]:
    out: dict[str, Any] = dict(params.flat())
    out.update({f"timm.{k}": v for k, v in spec.kwargs.items()})
    out["timm.model_name"] = spec.model_name
    out["teacher"] = ctx.teacher_arch
    out["arch_key"] = spec.key
    return out


def _train(study: optuna.Study, trial: optuna.Trial, ctx: TrialContext, params: TrialParams, spec: StudentSpec,
           student: torch.nn.Module, tracked: TrialLatency, run: TrialRun, outcome: TrialOutcome,
           watch: Stopwatch) -> TrialOutcome:
    loss_fn = build_loss(params.loss, **params.loss_params)
    cfg = TrainConfig(epochs=params.epochs, batch_size=params.batch_size, lr=params.lr,
                      weight_decay=params.weight_decay, optimizer=params.optimizer,
                      seed=ctx.settings.seed + trial.number, device=ctx.device, compile=ctx.settings.compile)
    rungs = set(pruning.rung_epochs(params.epochs, ctx.space.pruning.min_epoch, ctx.space.pruning.eta))
    curve: list[float] = []
    holding: list[TrainingHold] = []  # the training hold, while training

    def probe_latency(every_s: float) -> None:
        # A provisional figure is probed between two steps: out of the training hold (the measuring lock waits
        # for every trainer, this one too), timed as latency, not as training or epoch bookkeeping.
        if not tracked.probe_due(every_s):  # on every step: nothing but a clock read until a probe is due
            return
        was_settled = tracked.settled
        with watch.section("latency_s"), holding[0].released() if holding else contextlib.nullcontext():
            changed = tracked.probe(every_s)
        if changed:
            outcome.latency_ms = tracked.result.median_ms
            if tracked.settled and not was_settled:  # recorded once settled and at the end, not at every probe
                _record_latency(trial, tracked)

    def on_step() -> None:
        if holding:
            holding[0].pause_point()
        probe_latency(PROBE_EVERY_S)

    def on_epoch(result: EpochResult) -> None:
        probe_latency(0.0)
        latency = tracked.result
        with watch.section("epoch_bookkeeping_s"):
            curve.append(result.val_acc)
            outcome.epochs_trained = result.epoch
            trial.set_user_attr(trials.CURVE_ATTR, curve)
            run.log_epoch(result.epoch, {"train_loss": result.train_loss, "val_acc": result.val_acc,
                                         "lr": result.lr, "epoch_seconds": result.seconds})
            if result.epoch in rungs:
                record = pruning.RungRecord(trial=trial.number, epoch=result.epoch, accuracy=result.val_acc,
                                            latency_ms=latency.median_ms, latency_settled=latency.settled)
                trial.set_user_attr(*pruning.encode_rung(record))
                if ctx.settings.prune:
                    peers = pruning.records_at(result.epoch, ((t.number, t.user_attrs)
                                                              for t in study.get_trials(deepcopy=False)),
                                               trial.number)
                    if pruning.should_prune(record, peers, eta=ctx.space.pruning.eta,
                                            min_peers=ctx.space.pruning.min_peers):
                        outcome.reason = f"dominated at epoch {result.epoch} among {len(peers) + 1} trials"
                        trial.set_user_attr(trials.PRUNED_AT_EPOCH_ATTR, result.epoch)
                        run.set_tags({"autokd.prune_rung": str(result.epoch)})
                        raise optuna.TrialPruned(outcome.reason)

    # Shared CPU gate: a worker measuring latency on this machine waits until no one trains. train_s includes
    # that wait and leaves out the epochs' bookkeeping (timed also when a pruned trial leaves from inside it).
    with watch.section("train_s"), ctx.train_lock() if ctx.train_lock else contextlib.nullcontext() as hold:
        if hold is not None:
            holding.append(hold)
        result = distill(student, loss_fn, ctx.data, cfg,
                         teacher=ctx.teacher_outputs if loss_fn.uses_teacher else None, views=ctx.views,
                         on_epoch=on_epoch, on_step=on_step)
    holding.clear()
    val_acc = float(result.val_acc)
    if not math.isfinite(val_acc):  # never let a non-finite value reach the study
        raise NonFiniteLossError(f"validation accuracy is not finite ({val_acc})")
    if not tracked.settled:  # the told values are final: not on a provisional figure, if the host allows
        with watch.section("latency_s"):
            tracked.settle()
    if tracked.refinements:
        _record_latency(trial, tracked)
        _log_latency(run, tracked.result)
    latency = tracked.result
    outcome.latency_ms = latency.median_ms

    with watch.section("save_s"):
        out_dir = ctx.trials_dir / str(trial.number)
        meta = {"study": study.study_name, "trial": trial.number, "val_acc": val_acc,
                "latency_ms": latency.median_ms, "teacher": ctx.teacher_arch, "dataset": ctx.data.name,
                "data_fingerprint": ctx.data.fingerprint}
        try:
            _save_checkpoint(student, spec, params, meta, out_dir)
        except OSError as exc:
            raise FatalSearchError(f"cannot write the checkpoint of trial {trial.number} to {out_dir}: {exc}. "
                                   "Free disk space or fix the permissions of the studies directory, then rerun "
                                   "the same command: finished trials are kept.") from exc
        run.log_metrics({"final_val_acc": val_acc, "train_seconds": result.seconds})
        run.log_artifacts(out_dir, "student")
        trial.set_user_attr(trials.CHECKPOINT_ATTR, str(out_dir))
    trials.finish(study, trial, State.COMPLETE, values=[val_acc, latency.median_ms], run=run)
    outcome.state = State.COMPLETE
    outcome.val_acc = val_acc
    del student, loss_fn, result
    return outcome


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "oom"
    if isinstance(exc, NonFiniteLossError):
        return f"nonfinite: {exc}"
    return f"error: {exc.__class__.__name__}: {exc}"


def _release_memory(device: str) -> None:
    # Models, optimizers and autograd graphs of the finished trial must not accumulate across 50 trials.
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


"""The distillation loop: one student, one loss, in-memory data, a per-epoch callback.

Deliberately free of Optuna and MLflow: callers observe progress through ``on_epoch`` and stop training by
raising from it (e.g. ``optuna.TrialPruned``); the exception propagates unchanged.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from torch import Tensor, nn

from autokd.config import OPTIMIZERS
from autokd.model.data import DataSplits, TrainViews
from autokd.model.students import feature_channels, forward_with_features

if TYPE_CHECKING:
    from autokd.model.losses import KDLoss


class TeacherSource(Protocol):
    """What the loop needs from a teacher (e.g. :mod:`autokd.model.teacher`'s cached or online outputs): its logits,
    and its feature maps for a feature loss, for a batch ``x_view`` of training view ``view`` (``idx``: the
    images' indices in the training split)."""

    mode: str  # "cached" | "online": reported as TrainResult.teacher_mode
    feature_channels: int | None  # channels of features(); None when it gives none

    def logits(self, x_view: Tensor, idx: Tensor, view: int) -> Tensor: ...

    def features(self, x_view: Tensor, idx: Tensor, view: int) -> Tensor: ...


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 5e-4
    optimizer: str = "adamw"  # "adamw" | "sgd" (momentum 0.9, nesterov)
    seed: int = 0
    device: str = "cpu"
    amp: bool | None = None  # None = bf16 autocast on CUDA only
    # On CUDA and on the CPU too: oneDNN's NHWC convolutions make training steps faster for every student
    # family (docs/design.md, "Decisions").
    channels_last: bool = True
    # False, True (torch.compile's default mode) or a torch.compile mode name: "reduce-overhead" adds CUDA
    # graphs. Compiled steps see one batch shape only: a smaller last batch runs the same module eagerly.
    compile: bool | str = False


@dataclass
class EpochResult:
    epoch: int  # 1-based
    train_loss: float  # mean over the epoch's steps
    val_acc: float
    lr: float  # learning rate of the epoch's last step
    seconds: float  # training + validation time of this epoch


@dataclass
class TrainResult:
    epochs: list[EpochResult] = field(default_factory=list)
    val_acc: float = 0.0  # last epoch
    best_val_acc: float = 0.0
    seconds: float = 0.0
    teacher_mode: str = "none"  # "cached" | "online" | "none"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch and step."""


def _make_optimizer(name: str, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW (default) or Nesterov SGD, with the fused implementation where this torch and device have one.

    On the CPU the default per-tensor AdamW step is a sizeable share of a small student's training time, and
    the fused step is several times faster (docs/design.md, "Decisions"). Older torch (fused CPU optimizers came
    in 2.4) or a device without them falls back to the default implementation.
    """
    cls, extra = (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}) if name == "sgd" else (torch.optim.AdamW, {})
    try:
        return cls(groups, lr=lr, fused=True, **extra)
    except (RuntimeError, TypeError, ValueError):
        return cls(groups, lr=lr, **extra)


def distill(student: nn.Module, loss_fn: KDLoss, data: DataSplits, cfg: TrainConfig,
            teacher: TeacherSource | None = None, views: TrainViews | None = None,
            on_epoch: Callable[[EpochResult], None] | None = None,
            on_step: Callable[[], None] | None = None) -> TrainResult:
    """Train ``student`` with ``loss_fn`` for ``cfg.epochs``; validate after every epoch and call ``on_epoch``.

    ``on_step`` is called after every optimizer step (a search uses it to let a waiting latency measurement
    onto the CPU between two steps, see :class:`autokd.locks.TrainingHold`).

    Deterministic on CPU for a fixed ``cfg.seed`` (shuffling, augmentation views and anything built here).
    """
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {cfg.epochs} and {cfg.batch_size}.")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; valid: {', '.join(OPTIMIZERS)}.")
    if loss_fn.uses_teacher and teacher is None:
        raise ValueError(f"loss {type(loss_fn).__name__} needs teacher outputs, got teacher=None")
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    amp = cuda if cfg.amp is None else cfg.amp
    if cuda:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    if data.x_train.device != device:
        data = data.to(device)

    student.to(device)
    if cfg.channels_last:
        student.to(memory_format=torch.channels_last)
    if loss_fn.uses_features:
        if getattr(teacher, "feature_channels", None) is None:
            raise ValueError("the loss needs teacher features: build the teacher outputs with need_features=True")
        loss_fn.bind_features(feature_channels(student), teacher.feature_channels)
    loss_fn.to(device)
    compiled = _compiled(student, cfg.compile)

    # Decay only weight matrices / conv kernels, not norms and biases (as in nanoGPT).
    params = [p for p in (*student.parameters(), *loss_fn.parameters()) if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = _make_optimizer(cfg.optimizer, groups, cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch

    def lr_at(epoch: int, step: int) -> float:
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * ((epoch - 1) * steps_per_epoch + step) / total_steps))

    step_ctx = _StepContext(student=student, compiled=compiled, loss_fn=loss_fn, optimizer=optimizer, data=data,
                            cfg=cfg, teacher=teacher if loss_fn.uses_teacher else None, views=views,
                            lr_at=lr_at, on_step=on_step,
                            autocast=(lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp
                            else contextlib.nullcontext)
    result = TrainResult(teacher_mode=teacher.mode if teacher is not None and loss_fn.uses_teacher else "none")
    started = time.perf_counter()

    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        student.train()
        loss_fn.train()
        # Same order as shuffling on the host and splitting it there; one copy to the device per epoch.
        order = torch.randperm(n, generator=generator).to(device, non_blocking=True)
        losses = _train_epoch(step_ctx, epoch, order)
        values = losses.tolist()  # the epoch's one read of its training state back to the host
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise NonFiniteLossError(f"non-finite training loss at epoch {epoch}, step {bad + 1} of "
                                     f"{steps_per_epoch} (lr {lr_at(epoch, bad):.3g})")
        lr = lr_at(epoch, steps_per_epoch - 1)
        val_acc = evaluate(student, data.x_val, data.y_val, amp=amp)
        r = EpochResult(epoch=epoch, train_loss=sum(values) / steps_per_epoch, val_acc=val_acc, lr=lr,
                        seconds=time.perf_counter() - t0)
        result.epochs.append(r)
        result.val_acc = val_acc
        result.best_val_acc = max(result.best_val_acc, val_acc)
        if on_epoch is not None:
            on_epoch(r)

    result.seconds = time.perf_counter() - started
    optimizer.zero_grad(set_to_none=True)
    student.eval()
    return result


@dataclass
class _StepContext:
    """What every step of a `distill` call uses (built once per call)."""

    student: nn.Module
    compiled: Callable[[Tensor], Tensor] | None
    loss_fn: KDLoss
    optimizer: torch.optim.Optimizer
    data: DataSplits
    cfg: TrainConfig
    teacher: TeacherSource | None
    views: TrainViews | None
    autocast: Callable[[], Any]  # bf16 autocast when amp, else a no-op context: chosen once, not per step
    lr_at: Callable[[int, int], float]
    on_step: Callable[[], None] | None


def _compiled(student: nn.Module, compile: bool | str) -> Callable[[Tensor], Tensor] | None:
    """``torch.compile(student)`` in the mode asked for (True: the default mode), or None when not compiling."""
    if compile is False or compile is None:
        return None
    mode = None if compile is True or compile == "default" else str(compile)
    return torch.compile(student, mode=mode)


def _train_epoch(ctx: _StepContext, epoch: int, order: Tensor) -> Tensor:
    """One epoch of steps over the batches of ``order`` (device indices); returns each step's loss, on the device.

    Nothing here reads a tensor back to the host: on a GPU any such read (``.item()``, ``if tensor``, printing a
    loss) waits for the device to finish, and the GPU then idles while Python prepares the next step. Each
    step's loss goes into a device buffer, read once after the last step, where the NaN guard finds the first
    non-finite step and the mean loss is taken.
    """
    cfg, loss_fn, data, teacher, views = ctx.cfg, ctx.loss_fn, ctx.data, ctx.teacher, ctx.views
    device = order.device
    batches = order.split(cfg.batch_size)
    losses = torch.empty(len(batches), device=device)
    view = views.view_for_epoch(epoch) if views is not None else 0
    for step, idx in enumerate(batches):
        for group in ctx.optimizer.param_groups:
            group["lr"] = ctx.lr_at(epoch, step)
        x, y = data.x_train[idx], data.y_train[idx]
        if views is not None:
            x = views.apply(x, idx, view)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t_logits = teacher.logits(x, idx, view) if teacher is not None else None
        t_feats = s_feats = None
        with ctx.autocast():
            if loss_fn.uses_features:
                t_feats = teacher.features(x, idx, view)
                s_logits, s_feats = forward_with_features(ctx.student, x)
            elif ctx.compiled is not None and len(idx) == cfg.batch_size:
                # A new iteration for CUDA graph trees ("reduce-overhead"); a no-op for other modes.
                torch.compiler.cudagraph_mark_step_begin()
                s_logits = ctx.compiled(x)
            else:
                s_logits = ctx.student(x)
        loss = loss_fn(s_logits.float(), t_logits, y, epoch=epoch, student_features=s_feats,
                       teacher_features=t_feats)
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx.optimizer.step()
        losses[step] = loss.detach()
        if ctx.on_step is not None:
            ctx.on_step()
    return losses


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256, amp: bool | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in [0, 1]; eval mode, no autograd, batched.

    The model runs on the device of ``x``; ``amp`` (default: on CUDA) enables bf16 autocast.
    """
    if len(y) == 0:
        return 0.0
    amp = x.is_cuda if amp is None else amp
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        for i in range(0, len(y), batch_size):
            correct += (model(x[i:i + batch_size]).argmax(dim=1) == y[i:i + batch_size].to(x.device)).sum()
    model.train(was_training)
    return correct.item() / len(y)

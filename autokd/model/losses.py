"""Knowledge-distillation losses behind a small timm-style registry (``register_loss``, ``build_loss``).

Every loss is a :class:`KDLoss` with one call signature, whose value already includes the hard-label term.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autokd.errors import did_you_mean

__all__ = [
    "KDLoss",
    "available_losses",
    "build_loss",
    "register_loss",
    "CELoss",
    "KDLossHinton",
    "MSELoss",
    "DKDLoss",
    "HintLoss",
]


@dataclass(frozen=True)
class _HParam:
    """Declared hyperparameter: default value, validity check and a human-readable valid range."""

    default: float
    check: Callable[[float], bool]
    valid: str


def _temperature(default: float) -> _HParam:
    return _HParam(default, lambda v: v > 0, "> 0")


def _unit(default: float) -> _HParam:
    return _HParam(default, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")


def _nonneg(default: float) -> _HParam:
    return _HParam(default, lambda v: v >= 0, ">= 0")


_LOSSES: dict[str, type[KDLoss]] = {}


def register_loss(name: str) -> Callable[[type[KDLoss]], type[KDLoss]]:
    """Class decorator that adds a ``KDLoss`` subclass to the registry under ``name``."""

    def wrap(cls: type[KDLoss]) -> type[KDLoss]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered (by {_LOSSES[name].__name__})")
        cls.name = name
        _LOSSES[name] = cls
        return cls

    return wrap


def available_losses() -> list[str]:
    """Names accepted by ``build_loss``, sorted."""
    return sorted(_LOSSES)


def build_loss(name: str, **hparams: Any) -> KDLoss:
    """Create the loss registered as ``name`` with the given hyperparameters (unset ones take defaults).

    Raises ValueError for an unknown loss name or a hyperparameter that is unknown or out of range, TypeError
    for a hyperparameter value that is not a number.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _LOSSES:
        valid = available_losses()
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(valid)}"
                         f"{did_you_mean(str(key), valid, prefix=True)}")
    return _LOSSES[key](**hparams)


def _check_hparams(loss: str, spec: dict[str, _HParam], given: dict[str, Any]) -> dict[str, float]:
    """Validate ``given`` against ``spec`` and return the complete, resolved hyperparameter dict."""
    valid_names = ", ".join(sorted(spec)) if spec else "none (this loss takes no hyperparameters)"
    resolved: dict[str, float] = {}
    for key, value in given.items():
        if key not in spec:
            raise ValueError(f"loss {loss!r}: unknown hyperparameter {key!r}; valid hyperparameters: {valid_names}"
                             f"{did_you_mean(key, spec, prefix=True)}")
        hp = spec[key]
        # bool is a Real subclass; a flag where a number belongs is almost surely a config mistake
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"loss {loss!r}: hyperparameter {key}={value!r} must be a number {hp.valid}")
        fvalue = float(value)
        if not math.isfinite(fvalue) or not hp.check(fvalue):
            raise ValueError(f"loss {loss!r}: hyperparameter {key}={value!r} is out of range; valid: {key} {hp.valid}")
        resolved[key] = fvalue
    return {key: resolved.get(key, hp.default) for key, hp in spec.items()}


def _ce(student_logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(student_logits.float(), targets)


def _kl_soft(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes and averaged over the batch."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


def _need_teacher(loss: str, teacher_logits: Tensor | None) -> Tensor:
    if teacher_logits is None:
        raise ValueError(f"loss {loss!r} needs teacher_logits, got None")
    return teacher_logits


class KDLoss(nn.Module):
    """Base class of every registered loss.

    Subclasses declare ``hparam_spec`` and implement ``forward``; the resolved hyperparameters are in
    ``self.hparams`` and also set as attributes (``self.temperature``...). Every loss is called as::

        loss_fn(student_logits, teacher_logits, targets, epoch=None,
                student_features=None, teacher_features=None) -> scalar tensor

    The returned value already includes the hard-label (cross-entropy) term, so the training loop only calls
    ``backward()`` on it. Arguments a loss does not use are ignored (``ce`` accepts ``teacher_logits=None``).
    Loss arithmetic runs in float32 even under autocast, and teacher outputs are detached.
    """

    name: ClassVar[str] = ""
    hparam_spec: ClassVar[dict[str, _HParam]] = {}
    uses_teacher: bool = True
    uses_features: bool = False

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        self.hparams: dict[str, float] = _check_hparams(self.name or type(self).__name__, self.hparam_spec, hparams)
        for key, value in self.hparams.items():
            setattr(self, key, value)

    def bind_features(self, student_channels: int, teacher_channels: int) -> None:
        """Create learned feature adapters; a no-op for losses that do not use features."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor, epoch: int | None = None,
                student_features: Tensor | None = None, teacher_features: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.hparams.items())


@register_loss("ce")
class CELoss(KDLoss):
    """Plain cross-entropy on the hard labels; the teacher is not used (baseline without distillation)."""

    uses_teacher = False

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor, epoch: int | None = None,
                student_features: Tensor | None = None, teacher_features: Tensor | None = None) -> Tensor:
        return _ce(student_logits, targets)


@register_loss("kd")
class KDLossHinton(KDLoss):
    """Hinton et al. (2015) distillation::

        alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)

    KL is summed over classes and averaged over the batch ("batchmean"); T^2 keeps the soft-target gradient
    magnitude independent of T. Here ``alpha`` weights the *distillation* term. Libraries disagree on this
    convention (some weight the hard-label term by alpha instead), so check before copying values from
    papers or other code. Defaults: temperature=4, alpha=0.9.
    """

    hparam_spec = {"temperature": _temperature(4.0), "alpha": _unit(0.9)}

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor, epoch: int | None = None,
                student_features: Tensor | None = None, teacher_features: Tensor | None = None) -> Tensor:
        t = _need_teacher(self.name, teacher_logits)
        kl = _kl_soft(student_logits, t, self.temperature)
        return self.alpha * kl + (1.0 - self.alpha) * _ce(student_logits, targets)


@register_loss("mse")
class MSELoss(KDLoss):
    """Logit matching: ``alpha * MSE(s_logits, t_logits) + (1 - alpha) * CE(s, y)``.

    MSE is the mean over all batch x class elements. Default alpha=0.5.
    """

    hparam_spec = {"alpha": _unit(0.5)}

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor, epoch: int | None = None,
                student_features: Tensor | None = None, teacher_features: Tensor | None = None) -> Tensor:
        t = _need_teacher(self.name, teacher_logits)
        mse = F.mse_loss(student_logits.float(), t.detach().float())
        return self.alpha * mse + (1.0 - self.alpha) * _ce(student_logits, targets)


@register_loss("dkd")
class DKDLoss(KDLoss):
    """Decoupled Knowledge Distillation (Zhao et al., CVPR 2022), as in the official mdistiller code::

        CE(s, y) + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)

    TCKD is the KL between the binary (target, non-target) probabilities of teacher and student; NCKD the KL
    between their distributions over the non-target classes, obtained by subtracting 1000 from the
    target-class logit (after dividing by T) before the softmax. Both are summed over classes, divided by the
    batch size and scaled by T^2. ``epoch`` is the 1-based epoch (as mdistiller); ``epoch=None`` or
    ``warmup=0`` mean no warm-up (factor 1). Defaults: alpha=1, beta=8, temperature=4, warmup=20.

    One deliberate difference from mdistiller: the binary log-probabilities are computed with logsumexp
    instead of ``log(sum(softmax))``; the value is identical but does not become -inf (and NaN gradients)
    when the student is very confident.
    """

    hparam_spec = {
        "alpha": _unit(1.0),
        "beta": _nonneg(8.0),
        "temperature": _temperature(4.0),
        "warmup": _nonneg(20.0),
    }

    def warmup_factor(self, epoch: int | None) -> float:
        """Weight of the DKD terms at ``epoch``: ``min(epoch / warmup, 1)``; 1 when epoch is None or warmup 0."""
        if epoch is None or self.warmup == 0:
            return 1.0
        return min(max(float(epoch), 0.0) / self.warmup, 1.0)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor, epoch: int | None = None,
                student_features: Tensor | None = None, teacher_features: Tensor | None = None) -> Tensor:
        ce = _ce(student_logits, targets)
        factor = self.warmup_factor(epoch)
        if factor == 0.0:
            return ce
        t = _need_teacher(self.name, teacher_logits)
        return ce + factor * self.dkd_terms(student_logits, t, targets)

    def dkd_terms(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
        """``alpha * TCKD + beta * NCKD`` (without CE and warm-up)."""
        temp = self.temperature
        s = student_logits.float() / temp
        t = teacher_logits.detach().float() / temp
        batch = targets.shape[0]
        gt_mask = torch.zeros_like(s).scatter_(1, targets.reshape(-1, 1), 1.0).bool()

        tckd = F.kl_div(_binary_log_probs(s, gt_mask), _binary_log_probs(t, gt_mask), reduction="sum",
                        log_target=True) * temp**2 / batch

        log_s_other = F.log_softmax(s - 1000.0 * gt_mask, dim=1)
        p_t_other = F.softmax(t - 1000.0 * gt_mask, dim=1)
        nckd = F.kl_div(log_s_other, p_t_other, reduction="sum") * temp**2 / batch

        return self.alpha * tckd + self.beta * nckd


def _binary_log_probs(scaled_logits: Tensor, gt_mask: Tensor) -> Tensor:
    """[B, 2] log-probabilities of (target class, any other class) under softmax(scaled_logits)."""
    log_z = torch.logsumexp(scaled_logits, dim=1, keepdim=True)
    log_gt = scaled_logits.masked_fill(~gt_mask, -math.inf).logsumexp(dim=1, keepdim=True)
    log_other = scaled_logits.masked_fill(gt_mask, -math.inf).logsumexp(dim=1, keepdim=True)
    return torch.cat([log_gt, log_other], dim=1) - log_z


def _as_map(features: Tensor, which: str) -> Tensor:
    if features.dim() == 2:
        return features[:, :, None, None]
    if features.dim() != 4:
        raise ValueError(f"{which} must be [B,C,H,W] or [B,C], got shape {tuple(features.shape)}")
    return features


@register_loss("hint")
class HintLoss(KDLoss):
    """FitNets-style hint loss on top of logit KD::

        (1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))
            + beta * MSE(adapter(student_features), teacher_features)

    The adapter is a learned 1x1 convolution (student channels -> teacher channels) created by
    ``bind_features``, which must be called before the optimizer is built so the adapter's parameters are
    trained. Features are [B,C,H,W]; [B,C] is treated as a 1x1 map. When spatial sizes differ, the student
    map is resized to the teacher's size with adaptive average pooling (an average over blocks when it is
    larger, replication when it is smaller). MSE is the mean over all elements.
    Defaults: alpha=0.5 (may be 0: pure hint + CE), temperature=4, beta=1.0.
    """

    hparam_spec = {"alpha": _unit(0.5), "temperature": _temperature(4.0), "beta": _nonneg(1.0)}
    uses_features = True

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.adapter: nn.Conv2d | None = None

    def bind_features(self, student_channels: int, teacher_channels: int) -> None:
        """Create the 1x1 conv adapter ``student_channels -> teacher_channels`` (replacing any previous one)."""
        if student_channels < 1 or teacher_channels < 1:
            raise ValueError(f"channel counts must be >= 1, got {student_channels} and {teacher_channels}")
        self.adapter = nn.Conv2d(int(student_channels), int(teacher_channels), kernel_size=1)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor, epoch: int | None = None,
                student_features: Tensor | None = None, teacher_features: Tensor | None = None) -> Tensor:
        if self.adapter is None:
            raise RuntimeError("hint loss: call bind_features(student_channels, teacher_channels) before the "
                               "first forward (and before building the optimizer, so the adapter is trained)")
        if student_features is None or teacher_features is None:
            raise ValueError("hint loss needs student_features and teacher_features")
        s_map = _as_map(student_features, "student_features")
        t_map = _as_map(teacher_features, "teacher_features").detach().float()
        if s_map.shape[1] != self.adapter.in_channels or t_map.shape[1] != self.adapter.out_channels:
            raise ValueError(
                f"hint loss was bound to {self.adapter.in_channels} student / {self.adapter.out_channels} teacher "
                f"channels, got features with {s_map.shape[1]} / {t_map.shape[1]}")
        if s_map.shape[-2:] != t_map.shape[-2:]:
            s_map = F.adaptive_avg_pool2d(s_map, t_map.shape[-2:])
        weight = self.adapter.weight
        if weight.device != s_map.device:
            # keeps Parameter identity, so an optimizer built earlier still holds the adapter
            self.adapter.to(s_map.device)
        s_map = s_map.to(weight.dtype)
        # Under autocast the conv may run in bf16; the loss itself is taken in float32.
        hint = F.mse_loss(self.adapter(s_map).float(), t_map)

        loss = (1.0 - self.alpha) * _ce(student_logits, targets) + self.beta * hint
        if self.alpha > 0:
            t = _need_teacher(self.name, teacher_logits)
            loss = loss + self.alpha * _kl_soft(student_logits, t, self.temperature)
        return loss

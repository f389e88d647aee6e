"""Student architectures: timm families scaled by two multipliers (width, depth), and their architecture key.

Owns the family registry, the three ``autokd_*`` timm entry points (registered in timm's model registry on
import, so ``timm.create_model`` builds every family) and ``forward_with_features`` for the hint loss. Builds
models only; it never trains or times them.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any, Callable

import timm
import torch
from timm.layers import make_divisible
from timm.models import (
    EfficientNet,
    MobileNetV3,
    RegNetCfg,
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
)
from torch import nn

from autokd._internals.timm import (
    SqueezeExcite,
    StagedRegNet,
    StagedRegNetCfg,
    decode_arch_def,
    regnet_cfgs,
    resolve_act_layer,
    resolve_bn_args,
    round_channels,
)
from autokd.errors import did_you_mean

MAX_MULTIPLIER = 4.0
ResolveFn = Callable[[float, float, int], "tuple[str, dict[str, Any]]"]  # (width, depth, input_size)


# ---------------------------------------------------------------------------------------------------------
# Family registry


@dataclass(frozen=True)
class Family:
    """A student family: a name and the function mapping (width, depth, input_size) to timm arguments."""

    name: str
    resolve: ResolveFn


_families: dict[str, Family] = {}


def register_family(name: str) -> Callable[[ResolveFn], ResolveFn]:
    """Register ``fn(width, depth, input_size) -> (timm model name, kwargs)`` as the family ``name``."""

    def decorator(fn: ResolveFn) -> ResolveFn:
        _families[name] = Family(name=name, resolve=fn)
        return fn

    return decorator


def available_families() -> list[str]:
    """Names of the registered student families, sorted."""
    return sorted(_families)


def _depth(n: int, depth: float) -> int:
    # Round half up (not Python's banker's rounding) so 1.5 blocks -> 2 at every call site.
    return max(1, int(math.floor(n * depth + 0.5)))


def _width(c: int, width: float, divisor: int = 8) -> int:
    return int(make_divisible(c * width, divisor))


# ---------------------------------------------------------------------------------------------------------
# timm entry points for the families whose stock entry points do not take per-stage sizes

default_cfgs = generate_default_cfgs({  # read by timm's register_model: no pretrained weights, small inputs
    name: {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (1, 1), "crop_pct": 1.0,
           "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "first_conv": first_conv, "classifier": classifier}
    for name, first_conv, classifier in [
        ("autokd_mobilenetv3", "conv_stem", "classifier"),
        ("autokd_efficientnet", "conv_stem", "classifier"),
        ("autokd_regnet", "stem.conv", "head.fc"),
    ]
})


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(f"timm model {name!r} is an autokd student layout; it has no pretrained weights "
                         "(build it with pretrained=False)")


def _block_model_kwargs(arch_def: list[list[str]], num_features: int, stem_size: int) -> dict[str, Any]:
    """What timm's MobileNetV3 and EfficientNet classes take alike: the decoded blocks, head and stem sizes."""
    return dict(block_args=decode_arch_def(arch_def), num_features=num_features, stem_size=stem_size, fix_stem=True,
                round_chs_fn=round_channels)


@register_model
def autokd_mobilenetv3(pretrained: bool = False, arch_def: list[list[str]] | None = None, stem_size: int = 16,
                       num_features: int = 1024, **kwargs: Any) -> nn.Module:
    """MobileNetV3 from an explicit ``arch_def`` (the recipe of timm's ``_gen_mobilenet_v3``, no multipliers)."""
    _no_pretrained("autokd_mobilenetv3", pretrained)
    if arch_def is None:
        arch_def = _mnv3_arch_def(1.0, 1.0)
    model_kwargs = dict(
        **_block_model_kwargs(arch_def, num_features, stem_size),
        norm_layer=partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
        act_layer=resolve_act_layer(kwargs, "hard_swish"),
        se_layer=partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU,
                         rd_round_fn=round_channels),
        **kwargs,
    )
    return build_model_with_cfg(MobileNetV3, "autokd_mobilenetv3", False, **model_kwargs)


@register_model
def autokd_efficientnet(pretrained: bool = False, arch_def: list[list[str]] | None = None, stem_size: int = 16,
                        num_features: int = 640, **kwargs: Any) -> nn.Module:
    """EfficientNet from an explicit ``arch_def`` (the recipe of timm's ``_gen_efficientnet``, no multipliers)."""
    _no_pretrained("autokd_efficientnet", pretrained)
    if arch_def is None:
        arch_def = _effnet_arch_def(1.0, 1.0)
    model_kwargs = dict(
        **_block_model_kwargs(arch_def, num_features, stem_size),
        act_layer=resolve_act_layer(kwargs, "swish"),
        norm_layer=kwargs.pop("norm_layer", None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
        **kwargs,
    )
    return build_model_with_cfg(EfficientNet, "autokd_efficientnet", False, **model_kwargs)


# timm derives RegNet stages from (w0, wa, wm, depth), which cannot scale each stage's depth (small depths lose
# whole stages): StagedRegNet (timm_internals) takes explicit stage widths and depths instead.
_REGNET_BASE = "regnetx_002"
_REGNET_STAGE_WIDTHS = (24, 56, 152, 368)  # what timm derives from regnetx_002's (w0, wa, wm, depth)
_REGNET_STAGE_DEPTHS = (1, 1, 2, 4)  # regnetx_002 has (1, 1, 4, 7): halved, like the other bases


@register_model
def autokd_regnet(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """RegNetX-200MF with optional explicit ``stage_widths`` / ``stage_depths`` (other RegNetCfg fields too)."""
    _no_pretrained("autokd_regnet", pretrained)
    base = {f.name: getattr(regnet_cfgs[_REGNET_BASE], f.name) for f in fields(RegNetCfg)}
    cfg = StagedRegNetCfg(**base)
    for k in ("stage_widths", "stage_depths"):
        if k in kwargs:
            kwargs[k] = tuple(kwargs[k])
    return build_model_with_cfg(StagedRegNet, "autokd_regnet", False, model_cfg=cfg, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Families: base layouts and width/depth -> timm kwargs
# The bases with many small ops (MobileNetV3, EfficientNet, RegNet) keep about half of their timm depth, so
# their CPU latency is close to the other families'.

# (block string with {r} repeats and {c} channels, base repeats, base channels, depth-scaled)
# MobileNetV3-Small with about half its blocks; its ds stage has stride 1, not 2 (total stride 16).
_MNV3_BASE: list[tuple[str, int, int, bool]] = [
    ("ds_r{r}_k3_s1_e1_c{c}_se0.25_nre", 1, 16, True),
    ("ir_r{r}_k3_s2_e4_c{c}_nre", 1, 24, True),
    ("ir_r{r}_k5_s2_e4_c{c}_se0.25", 2, 40, True),
    ("ir_r{r}_k5_s1_e3_c{c}_se0.25", 1, 48, True),
    ("ir_r{r}_k5_s2_e6_c{c}_se0.25", 2, 96, True),
    ("cn_r{r}_k1_s1_c{c}", 1, 576, False),  # the 1x1 conv before pooling is not a block: never repeated
]
# EfficientNet-B0 at channel multiplier 0.5 with about half its blocks; the ir16 stage has stride 1 (total 16).
_EFFNET_BASE: list[tuple[str, int, int, bool]] = [
    ("ds_r{r}_k3_s1_e1_c{c}_se0.25", 1, 8, True),
    ("ir_r{r}_k3_s1_e6_c{c}_se0.25", 1, 16, True),
    ("ir_r{r}_k5_s2_e6_c{c}_se0.25", 1, 24, True),
    ("ir_r{r}_k3_s2_e6_c{c}_se0.25", 2, 40, True),
    ("ir_r{r}_k5_s1_e6_c{c}_se0.25", 2, 56, True),
    ("ir_r{r}_k5_s2_e6_c{c}_se0.25", 2, 96, True),
    ("ir_r{r}_k3_s1_e6_c{c}_se0.25", 1, 160, True),
]


def _arch_def(base: list[tuple[str, int, int, bool]], width: float, depth: float) -> list[list[str]]:
    return [[tmpl.format(r=_depth(r, depth) if scaled else r, c=_width(c, width))]
            for tmpl, r, c, scaled in base]


def _mnv3_arch_def(width: float, depth: float) -> list[list[str]]:
    return _arch_def(_MNV3_BASE, width, depth)


def _effnet_arch_def(width: float, depth: float) -> list[list[str]]:
    return _arch_def(_EFFNET_BASE, width, depth)


@register_family("resnet")
def _resnet(width: float, depth: float, input_size: int) -> tuple[str, dict[str, Any]]:
    # Deep stem: timm's 7x7 stem is fixed at 64 channels. timm's strides are kept (total 32: a 1x1 last map
    # at 32 px; 16 px works too).
    channels = [_width(c, width) for c in (32, 64, 128, 256)]
    return "resnet18", {
        "layers": [_depth(n, depth) for n in (2, 2, 2, 2)],
        "channels": channels,
        "stem_type": "deep",
        "stem_width": _width(channels[0] / 2, 1.0),
    }


@register_family("mobilenetv3")
def _mobilenetv3(width: float, depth: float, input_size: int) -> tuple[str, dict[str, Any]]:
    return "autokd_mobilenetv3", {
        "arch_def": _mnv3_arch_def(width, depth),
        "stem_size": _width(16, width),
        "num_features": _width(1024, width),
    }


@register_family("efficientnet")
def _efficientnet(width: float, depth: float, input_size: int) -> tuple[str, dict[str, Any]]:
    return "autokd_efficientnet", {
        "arch_def": _effnet_arch_def(width, depth),
        "stem_size": _width(16, width),
        "num_features": _width(640, width),
    }


@register_family("regnet")
def _regnet(width: float, depth: float, input_size: int) -> tuple[str, dict[str, Any]]:
    return "autokd_regnet", {
        "stage_widths": [_width(w, width) for w in _REGNET_STAGE_WIDTHS],
        "stage_depths": [_depth(d, depth) for d in _REGNET_STAGE_DEPTHS],
        "stem_width": _width(32, width),
    }


@register_family("convnext")
def _convnext(width: float, depth: float, input_size: int) -> tuple[str, dict[str, Any]]:
    # The downsamples are unpadded 2x2 convs: at stride 32 a 16 px input would reach them at 1x1 and fail.
    return "convnext_atto", {
        "depths": [_depth(d, depth) for d in (1, 1, 3, 1)],
        "dims": [_width(c, width) for c in (32, 64, 128, 256)],
        "output_stride": 16 if input_size >= 16 else 8,
    }


_VIT_HEAD_DIM = 16


@register_family("vit")
def _vit(width: float, depth: float, input_size: int) -> tuple[str, dict[str, Any]]:
    embed_dim = _width(64, width, _VIT_HEAD_DIM)
    patch = 4 if input_size < 64 else 8 if input_size < 128 else 16
    # When input_size is not a multiple of the patch, timm's strided patch conv ignores the < patch border.
    return "vit_tiny_patch16_224", {
        "img_size": input_size,
        "patch_size": patch,
        "embed_dim": embed_dim,
        "depth": _depth(6, depth),
        "num_heads": embed_dim // _VIT_HEAD_DIM,
    }


# ---------------------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class StudentSpec:
    """A resolved student: everything needed to rebuild it with ``timm.create_model``."""

    family: str
    width: float
    depth: float
    model_name: str
    kwargs: dict
    num_classes: int
    in_chans: int
    input_size: int

    @property
    def key(self) -> str:
        """Architecture key, e.g. ``resnet-3f2a9c1d0b``: stable across processes; ignores width/depth as such."""
        ident = json.dumps(
            {"model_name": self.model_name, "kwargs": self.kwargs, "num_classes": self.num_classes,
             "in_chans": self.in_chans, "input_size": self.input_size},
            sort_keys=True, separators=(",", ":"))
        return f"{self.family}-{hashlib.sha1(ident.encode()).hexdigest()[:10]}"

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (includes ``key`` for readers; ``from_dict`` ignores it)."""
        d = asdict(self)
        d["kwargs"] = json.loads(json.dumps(self.kwargs))
        d["key"] = self.key
        return d

    @staticmethod
    def from_dict(d: dict) -> StudentSpec:
        """Inverse of ``to_dict``."""
        names = {f.name for f in fields(StudentSpec)}
        missing = names - set(d)
        if missing:
            raise ValueError(f"student spec is missing {sorted(missing)}; got keys {sorted(d)}")
        return StudentSpec(**{k: d[k] for k in names})


def _check_multiplier(name: str, value: Any) -> float:
    message = (f"student {name} multiplier {value!r} is out of range: it must be a finite number in "
               f"(0, {MAX_MULTIPLIER:g}] (1.0 = the family's base network)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(message)
    if not math.isfinite(value) or not (0.0 < value <= MAX_MULTIPLIER):
        raise ValueError(message)
    return float(value)


def _check_positive_int(name: str, value: Any, minimum: int) -> int:
    message = f"student {name} {value!r} is invalid: it must be an integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(message)
    if value < minimum:
        raise ValueError(message)
    return value


def resolve_student(family: str, width: float, depth: float, num_classes: int, in_chans: int,
                    input_size: int) -> StudentSpec:
    """Validate the choice and resolve it to timm arguments (no model is built).

    Every family maps the multipliers the same way: ``width`` scales channel counts / embedding dims (rounded
    to multiples of 8, or of the head dim for ViT); ``depth`` scales the blocks of every stage
    (``max(1, round(n * depth))``, half rounding up, so each stage keeps at least one block). ``1.0`` is the
    family's small base network, sized for 16-32 px inputs. The spec's kwargs are resolved counts, not
    multipliers, so two multiplier pairs that round to the same network share one architecture key (and one
    latency measurement). An unknown family or a value out of range is a ValueError, a value of the wrong type
    (a bool or a string where a number belongs) a TypeError.
    """
    if family not in _families:
        valid = available_families()
        raise ValueError(f"unknown student family {family!r}{did_you_mean(family, valid)}; valid families: "
                         f"{', '.join(valid)}")
    width = _check_multiplier("width", width)
    depth = _check_multiplier("depth", depth)
    num_classes = _check_positive_int("num_classes", num_classes, 1)
    in_chans = _check_positive_int("in_chans", in_chans, 1)
    input_size = _check_positive_int("input_size", input_size, 8)
    model_name, kwargs = _families[family].resolve(width, depth, input_size)
    return StudentSpec(family=family, width=width, depth=depth, model_name=model_name, kwargs=kwargs,
                       num_classes=num_classes, in_chans=in_chans, input_size=input_size)


def build_from_spec(spec: StudentSpec) -> nn.Module:
    """Build the (randomly initialised) student described by ``spec``."""
    return timm.create_model(spec.model_name, pretrained=False, num_classes=spec.num_classes,
                             in_chans=spec.in_chans, **spec.kwargs)


# ---------------------------------------------------------------------------------------------------------
# Features for the hint loss


def feature_channels(model: nn.Module) -> int:
    """Channels of the feature map returned by ``forward_with_features`` (timm's ``num_features``)."""
    n = getattr(model, "num_features", None)
    if not isinstance(n, int) or n <= 0:
        raise TypeError(f"{type(model).__name__} is not a timm classifier with `num_features`")
    return n


def forward_with_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, last feature map ``[B, C, H, W]``) from one forward pass (timm's ``forward_features``); for ViT,
    the patch tokens (prefix tokens dropped) reshaped onto the patch grid."""
    feats = model.forward_features(x)
    logits = model.forward_head(feats)
    if feats.ndim == 3:
        tokens = feats[:, getattr(model, "num_prefix_tokens", 0):]
        b, n, c = tokens.shape
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is not None and int(grid[0]) * int(grid[1]) == n:
            h, w = int(grid[0]), int(grid[1])
        elif math.isqrt(n) ** 2 == n:
            h = w = math.isqrt(n)
        else:
            h, w = n, 1
        feats = tokens.transpose(1, 2).reshape(b, c, h, w)
    return logits, feats


__all__ = [
    "Family", "StudentSpec", "available_families", "build_from_spec", "feature_channels",
    "forward_with_features", "register_family", "resolve_student",
]

"""The timm internals that autokd's student entry points build on, kept in this one module.

timm has no public way to build a MobileNetV3 or an EfficientNet from an explicit block-string ``arch_def`` (its
builder helpers and the blocks' squeeze-excite live in private modules), nor to give a RegNet explicit per-stage
widths and depths (a RegNet's stages come from its private ``_get_stage_args``, from (w0, wa, wm, depth), which
cannot scale each stage's depth). Everything autokd takes from timm's internals is imported or subclassed here
only; tests/test_timm_internals.py pins what is relied on, so a timm upgrade that changes it fails there first
and clearly, instead of deep inside a search.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from timm.layers import calculate_drop_path_rates
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, resolve_bn_args, round_channels
from timm.models.regnet import RegNet, RegNetCfg, adjust_widths_groups_comp
from timm.models.regnet import model_cfgs as regnet_cfgs

__all__ = [
    "SqueezeExcite", "StagedRegNet", "StagedRegNetCfg", "decode_arch_def", "regnet_cfgs", "resolve_act_layer",
    "resolve_bn_args", "round_channels",
]


@dataclass
class StagedRegNetCfg(RegNetCfg):
    """RegNet config with explicit per-stage widths and depths (empty = timm's quasi-linear rule)."""

    stage_widths: tuple[int, ...] = ()
    stage_depths: tuple[int, ...] = ()


class StagedRegNet(RegNet):
    """timm RegNet whose stage widths/depths come from the config instead of (w0, wa, wm, depth)."""

    def _get_stage_args(self, cfg: StagedRegNetCfg, default_stride: int = 2, output_stride: int = 32,
                        drop_path_rate: float = 0.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        per_stage, common = super()._get_stage_args(
            cfg, default_stride=default_stride, output_stride=output_stride, drop_path_rate=drop_path_rate)
        if not cfg.stage_widths:
            return per_stage, common
        if not (len(cfg.stage_widths) == len(cfg.stage_depths) == len(per_stage)):
            raise ValueError(f"RegNet needs {len(per_stage)} stage widths and depths, got "
                             f"{list(cfg.stage_widths)} and {list(cfg.stage_depths)}")
        widths, groups = adjust_widths_groups_comp(
            list(cfg.stage_widths), [cfg.bottle_ratio] * len(per_stage), [cfg.group_size] * len(per_stage),
            min_ratio=cfg.group_min_ratio)
        dprs = calculate_drop_path_rates(drop_path_rate, list(cfg.stage_depths), stagewise=True)
        for args, w, g, d, dpr in zip(per_stage, widths, groups, cfg.stage_depths, dprs):
            args.update(out_chs=w, group_size=g, depth=d, drop_path_rates=dpr)
        return per_stage, common

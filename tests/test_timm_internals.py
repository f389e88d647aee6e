"""What autokd relies on in timm's internals (autokd/timm_internals.py): a timm upgrade that changes it fails here."""
from __future__ import annotations

import inspect
from dataclasses import fields

import timm
import torch
from timm.models import EfficientNet, MobileNetV3, RegNet, RegNetCfg, model_entrypoint
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
from autokd.model.students import autokd_efficientnet, autokd_mobilenetv3

ARCH_DEF = [["ds_r1_k3_s1_e1_c16_se0.25_nre"], ["ir_r2_k5_s2_e4_c24"], ["cn_r1_k1_s1_c96"]]


def test_decode_arch_def_reads_block_strings() -> None:
    stages = decode_arch_def(ARCH_DEF)
    assert [len(stage) for stage in stages] == [1, 2, 1]  # r: repeats
    [[ds], [ir, _], [cn]] = stages
    assert (ds["block_type"], ds["out_chs"], ds["stride"], ds["dw_kernel_size"]) == ("ds", 16, 1, 3)
    assert ds["se_ratio"] == 0.25
    assert ds["act_layer"] is nn.ReLU  # nre
    assert (ir["block_type"], ir["out_chs"], ir["stride"], ir["dw_kernel_size"]) == ("ir", 24, 2, 5)
    assert ir["exp_ratio"] == 4.0 and ir["se_ratio"] == 0.0
    assert (cn["block_type"], cn["out_chs"], cn["kernel_size"]) == ("cn", 96, 1)


def test_builder_helpers() -> None:
    assert resolve_act_layer({}, "hard_swish") is nn.Hardswish and resolve_act_layer({}, "swish") is nn.SiLU
    assert resolve_bn_args({}) == {} and resolve_bn_args({"bn_eps": 1e-3}) == {"eps": 1e-3}
    assert (round_channels(4), round_channels(20), round_channels(40)) == (8, 24, 40)  # multiples of 8


def test_squeeze_excite_takes_the_blocks_arguments() -> None:
    se = SqueezeExcite(32, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU, rd_round_fn=round_channels)
    assert se.conv_reduce.out_channels == 8 and isinstance(se.act1, nn.ReLU) and isinstance(se.gate, nn.Hardsigmoid)
    assert se(torch.randn(2, 32, 4, 4)).shape == (2, 32, 4, 4)


def test_regnet_base_config_and_stage_args() -> None:
    base = regnet_cfgs["regnetx_002"]
    assert isinstance(base, RegNetCfg) and (base.group_size, base.stem_width) == (8, 32)
    params = inspect.signature(RegNet._get_stage_args).parameters
    assert list(params) == ["self", "cfg", "default_stride", "output_stride", "drop_path_rate"]
    plain = {f.name: getattr(base, f.name) for f in fields(RegNetCfg)}
    stock = StagedRegNet(StagedRegNetCfg(**plain), num_classes=10)  # no explicit stages: timm's own rule
    stages = [stock.s1, stock.s2, stock.s3, stock.s4]
    assert [len(list(s.children())) for s in stages] == [1, 1, 4, 7]
    assert [s.b1.conv3.conv.out_channels for s in stages] == [24, 56, 152, 368]  # students.py's base widths
    staged = StagedRegNet(StagedRegNetCfg(**plain, stage_widths=(16, 32, 64, 128), stage_depths=(1, 2, 1, 3)),
                          num_classes=10)
    stages = [staged.s1, staged.s2, staged.s3, staged.s4]
    assert [len(list(s.children())) for s in stages] == [1, 2, 1, 3]
    assert [s.b1.conv3.conv.out_channels for s in stages] == [16, 32, 64, 128] and staged.num_features == 128
    assert [s.b1.conv2.conv.groups for s in stages] == [2, 4, 8, 16]  # group size 8
    assert staged.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_mobilenetv3_and_efficientnet_from_an_arch_def() -> None:
    """students.py's entry points: timm's public builder on timm's classes, with the private block helpers."""
    for entry, cls, features in ((autokd_mobilenetv3, MobileNetV3, 96), (autokd_efficientnet, EfficientNet, 64)):
        name = entry.__name__
        assert model_entrypoint(name) is entry  # registered with timm's public register_model
        model = timm.create_model(name, arch_def=ARCH_DEF, stem_size=8, num_features=64, num_classes=5,
                                  in_chans=1).eval()
        assert type(model) is cls and model.get_classifier().in_features == 64
        assert [len(stage) for stage in model.blocks] == [1, 2, 1]
        assert [type(m) for m in model.modules() if isinstance(m, SqueezeExcite)] == [SqueezeExcite]
        with torch.inference_mode():
            assert model(torch.randn(2, 1, 16, 16)).shape == (2, 5)
            assert model.forward_features(torch.randn(2, 1, 16, 16)).shape == (2, features, 4, 4)  # stride 4

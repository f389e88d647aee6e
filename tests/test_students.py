from __future__ import annotations

import json
import math

import pytest
import torch

from autokd.model.students import (
    StudentSpec,
    available_families,
    build_from_spec,
    feature_channels,
    forward_with_features,
    resolve_student,
)

FAMILIES = ["resnet", "mobilenetv3", "efficientnet", "regnet", "convnext", "vit"]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_available_families_has_the_contract_families() -> None:
    assert set(FAMILIES) <= set(available_families())
    assert available_families() == sorted(available_families())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("width,depth", [(0.25, 0.25), (0.5, 1.0), (1.0, 0.5)])
def test_builds_and_forwards_on_tiny_inputs(family: str, width: float, depth: float) -> None:
    model = build_from_spec(resolve_student(family, width, depth, num_classes=7, in_chans=1, input_size=16)).eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 7)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_rgb_32(family: str) -> None:
    model = build_from_spec(resolve_student(family, 0.5, 0.5, num_classes=10, in_chans=3, input_size=32)).eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("family", FAMILIES)
def test_params_grow_strictly_with_width_and_depth(family: str) -> None:
    by_width = [n_params(build_from_spec(resolve_student(family, w, 0.5, 10, 1, 16))) for w in (0.25, 0.5, 1.0)]
    by_depth = [n_params(build_from_spec(resolve_student(family, 0.25, d, 10, 1, 16))) for d in (0.5, 1.0, 2.0)]
    assert by_width == sorted(set(by_width)), by_width
    assert by_depth == sorted(set(by_depth)), by_depth


def test_kwargs_are_resolved_counts() -> None:
    spec = resolve_student("resnet", 0.5, 0.5, 10, 1, 32)
    assert spec.model_name == "resnet18"
    assert spec.kwargs["layers"] == [1, 1, 1, 1]
    assert spec.kwargs["channels"] == [16, 32, 64, 128]
    vit = resolve_student("vit", 1.5, 1.0, 10, 1, 32).kwargs
    assert vit["embed_dim"] % vit["num_heads"] == 0 and vit["patch_size"] == 4 and vit["img_size"] == 32
    for family in FAMILIES:
        kwargs = resolve_student(family, 2.0, 0.25, 10, 3, 32).kwargs
        assert json.loads(json.dumps(kwargs)) == kwargs  # JSON-serialisable, lists not tuples


def test_every_stage_keeps_a_block() -> None:
    spec = resolve_student("convnext", 1.0, 0.01, 10, 1, 32)
    assert spec.kwargs["depths"] == [1, 1, 1, 1]
    assert resolve_student("regnet", 1.0, 0.01, 10, 1, 32).kwargs["stage_depths"] == [1, 1, 1, 1]


def test_key_is_stable_and_distinguishes_architectures() -> None:
    spec = resolve_student("resnet", 0.5, 0.5, 10, 1, 32)
    assert spec.key.startswith("resnet-") and spec.key == resolve_student("resnet", 0.5, 0.5, 10, 1, 32).key
    others = [
        resolve_student("resnet", 1.0, 0.5, 10, 1, 32),
        resolve_student("resnet", 0.5, 1.0, 10, 1, 32),
        resolve_student("resnet", 0.5, 0.5, 11, 1, 32),
        resolve_student("resnet", 0.5, 0.5, 10, 3, 32),
        resolve_student("resnet", 0.5, 0.5, 10, 1, 16),
        resolve_student("regnet", 0.5, 0.5, 10, 1, 32),
    ]
    assert len({spec.key} | {o.key for o in others}) == len(others) + 1
    # Multipliers that round to the same network share the key (and so one latency measurement).
    assert resolve_student("resnet", 1.0, 1.0, 10, 1, 32).key == resolve_student("resnet", 1.01, 1.1, 10, 1, 32).key


def test_key_is_pinned_and_ignores_dict_order() -> None:
    # A golden value: the key must not depend on the process (hash seed), the run or kwargs insertion order.
    a = StudentSpec("resnet", 1.0, 1.0, "resnet18", {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}, 10, 1, 16)
    b = StudentSpec("resnet", 2.0, 3.0, "resnet18", {"channels": [8, 16, 32, 64], "layers": [1, 1, 1, 1]}, 10, 1, 16)
    assert a.key == b.key == "resnet-a03b97bc14"


def test_spec_dict_round_trip() -> None:
    spec = resolve_student("mobilenetv3", 0.75, 1.5, 10, 3, 32)
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["key"] == spec.key
    back = StudentSpec.from_dict(d)
    assert back == spec and back.key == spec.key
    assert n_params(build_from_spec(back)) == n_params(build_from_spec(spec))
    assert spec.to_dict() == d  # building does not mutate the spec's kwargs


def test_unknown_family_names_valid_ones_and_a_close_match() -> None:
    with pytest.raises(ValueError) as e:
        resolve_student("resnett", 1.0, 1.0, 10, 1, 32)
    msg = str(e.value)
    assert "'resnett'" in msg and "did you mean 'resnet'" in msg
    assert all(f in msg for f in FAMILIES)


@pytest.mark.parametrize("bad", [0, -1.0, 4.5, math.nan, math.inf, "1.0", True])
@pytest.mark.parametrize("which", ["width", "depth"])
def test_bad_multiplier(which: str, bad: object) -> None:
    args = {"width": 1.0, "depth": 1.0, which: bad}
    with pytest.raises(TypeError if isinstance(bad, (bool, str)) else ValueError) as e:
        resolve_student("resnet", args["width"], args["depth"], 10, 1, 32)
    msg = str(e.value)
    assert which in msg and repr(bad) in msg and "(0, 4]" in msg


def test_multiplier_upper_bound_is_inclusive() -> None:
    assert resolve_student("vit", 4.0, 0.1, 10, 1, 16).width == 4.0


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_with_features(family: str) -> None:
    model = build_from_spec(resolve_student(family, 0.25, 0.5, num_classes=5, in_chans=1, input_size=16)).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.inference_mode():
        logits, feats = forward_with_features(model, x)
        assert torch.allclose(logits, model(x), atol=1e-5)
    assert logits.shape == (2, 5)
    assert feats.ndim == 4 and feats.shape[0] == 2 and feats.shape[1] == feature_channels(model)
    if family == "vit":
        assert feats.shape[2:] == (4, 4)  # 16 px / patch 4


def test_features_carry_gradients() -> None:
    model = build_from_spec(resolve_student("convnext", 0.25, 0.25, 3, 1, 16))
    _, feats = forward_with_features(model, torch.randn(2, 1, 16, 16))
    feats.mean().backward()
    assert any(p.grad is not None for p in model.parameters())

"""Tests for autokd.losses: values checked against hand-written numpy formulas, gradients, and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autokd.model.losses import available_losses, build_loss

# Small fixed logits: batch of 3, 4 classes.
S = np.array([[1.0, -0.5, 0.3, 2.0], [0.2, 0.1, -1.0, 0.5], [-0.3, 1.5, 0.0, 0.7]])
T = np.array([[0.5, 0.2, -0.1, 3.0], [1.2, -0.4, 0.3, 0.0], [0.1, 2.5, -0.6, 0.4]])
Y = np.array([3, 0, 2])


def t(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32, requires_grad=grad)


def y() -> torch.Tensor:
    return torch.tensor(Y, dtype=torch.int64)


# --- reference formulas, written out with exp/log (float64) -----------------------------------------------

def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_ce(s: np.ndarray, labels: np.ndarray) -> float:
    p = np_softmax(s)
    return float(np.mean([-math.log(p[i, labels[i]]) for i in range(len(labels))]))


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    """Batch mean of sum_c p log(p/q)."""
    return float(np.sum(p * (np.log(p) - np.log(q))) / p.shape[0])


def np_kd_term(s: np.ndarray, tt: np.ndarray, temp: float) -> float:
    return temp**2 * np_kl(np_softmax(tt / temp), np_softmax(s / temp))


def np_dkd_terms(s: np.ndarray, tt: np.ndarray, labels: np.ndarray, alpha: float, beta: float, temp: float) -> float:
    ps, pt = np_softmax(s / temp), np_softmax(tt / temp)
    tckd = nckd = 0.0
    for i, g in enumerate(labels):
        bs = np.array([ps[i, g], 1 - ps[i, g]])
        bt = np.array([pt[i, g], 1 - pt[i, g]])
        tckd += np.sum(bt * np.log(bt / bs))
        # non-target distribution: renormalised softmax over the other classes only
        others = [c for c in range(s.shape[1]) if c != g]
        qs = ps[i, others] / ps[i, others].sum()
        qt = pt[i, others] / pt[i, others].sum()
        nckd += np.sum(qt * np.log(qt / qs))
    n = len(labels)
    return temp**2 * (alpha * tckd / n + beta * nckd / n)


def mdistiller_dkd(ls: torch.Tensor, lt: torch.Tensor, target: torch.Tensor, alpha: float, beta: float,
                   temperature: float) -> torch.Tensor:
    """Literal port of mdistiller's dkd_loss (mdistiller/distillers/DKD.py) as a cross-check."""
    gt_mask = torch.zeros_like(ls).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(ls).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([(x * gt_mask).sum(1, keepdim=True), (x * other_mask).sum(1, keepdim=True)], dim=1)

    ps = cat_mask(F.softmax(ls / temperature, dim=1))
    pt = cat_mask(F.softmax(lt / temperature, dim=1))
    tckd = F.kl_div(torch.log(ps), pt, reduction="sum") * temperature**2 / target.shape[0]
    pt2 = F.softmax(lt / temperature - 1000.0 * gt_mask, dim=1)
    ls2 = F.log_softmax(ls / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(ls2, pt2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def close(a: torch.Tensor, b: float) -> bool:
    return abs(float(a.detach()) - b) < 1e-5 * max(1.0, abs(b))


# --- registry ---------------------------------------------------------------------------------------------

def test_registry_lists_contract_losses() -> None:
    assert {"ce", "kd", "mse", "dkd", "hint"} <= set(available_losses())
    for name in available_losses():
        loss = build_loss(name)
        assert isinstance(loss, torch.nn.Module)
        assert loss.uses_teacher is (name != "ce")
        assert loss.uses_features is (name == "hint")


def test_defaults() -> None:
    assert build_loss("kd").hparams == {"temperature": 4.0, "alpha": 0.9}
    assert build_loss("mse").hparams == {"alpha": 0.5}
    assert build_loss("dkd").hparams == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20.0}
    assert build_loss("hint").hparams == {"alpha": 0.5, "temperature": 4.0, "beta": 1.0}
    assert build_loss("ce").hparams == {}


# --- values -----------------------------------------------------------------------------------------------

def test_ce_value_and_ignores_teacher() -> None:
    loss = build_loss("ce")
    expected = np_ce(S, Y)
    assert close(loss(t(S), None, y()), expected)
    assert close(loss(t(S), t(T), y()), expected)
    assert close(loss(t(S), t(T) * 100, y(), epoch=3), expected)


@pytest.mark.parametrize("temp,alpha", [(4.0, 0.9), (2.0, 0.3), (1.0, 0.0), (3.0, 1.0)])
def test_kd_value(temp: float, alpha: float) -> None:
    loss = build_loss("kd", temperature=temp, alpha=alpha)
    expected = alpha * np_kd_term(S, T, temp) + (1 - alpha) * np_ce(S, Y)
    assert close(loss(t(S), t(T), y()), expected)


def test_kd_temperature_squared_scaling() -> None:
    raw_kl = np_kl(np_softmax(T / 2.0), np_softmax(S / 2.0))
    value = build_loss("kd", temperature=2.0, alpha=1.0)(t(S), t(T), y())
    assert close(value, 4.0 * raw_kl)


@pytest.mark.parametrize("alpha", [0.5, 0.0, 1.0, 0.2])
def test_mse_value(alpha: float) -> None:
    mse = float(np.mean((S - T) ** 2))
    expected = alpha * mse + (1 - alpha) * np_ce(S, Y)
    assert close(build_loss("mse", alpha=alpha)(t(S), t(T), y()), expected)


@pytest.mark.parametrize("alpha,beta,temp", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (0.0, 0.5, 2.0)])
def test_dkd_value_without_warmup(alpha: float, beta: float, temp: float) -> None:
    loss = build_loss("dkd", alpha=alpha, beta=beta, temperature=temp, warmup=0)
    expected = np_ce(S, Y) + np_dkd_terms(S, T, Y, alpha, beta, temp)
    assert close(loss(t(S), t(T), y(), epoch=1), expected)
    assert close(loss(t(S), t(T), y(), epoch=None), expected)


def test_dkd_matches_mdistiller_reference() -> None:
    rng = np.random.default_rng(0)
    s, tt = rng.normal(size=(8, 10)) * 3, rng.normal(size=(8, 10)) * 3
    labels = torch.tensor(rng.integers(0, 10, size=8))
    ours = build_loss("dkd", warmup=0).dkd_terms(t(s), t(tt), labels)
    ref = mdistiller_dkd(t(s), t(tt), labels, 1.0, 8.0, 4.0)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_dkd_warmup() -> None:
    loss = build_loss("dkd", warmup=20)
    assert loss.warmup_factor(5) == 0.25
    assert loss.warmup_factor(0) == 0.0
    assert loss.warmup_factor(20) == 1.0 and loss.warmup_factor(40) == 1.0
    assert loss.warmup_factor(None) == 1.0
    assert build_loss("dkd", warmup=0).warmup_factor(0) == 1.0

    ce = np_ce(S, Y)
    terms = np_dkd_terms(S, T, Y, 1.0, 8.0, 4.0)
    assert close(loss(t(S), t(T), y(), epoch=0), ce)
    assert close(loss(t(S), t(T), y(), epoch=5), ce + 0.25 * terms)
    assert close(loss(t(S), t(T), y(), epoch=None), ce + terms)


def test_dkd_stable_for_confident_student() -> None:
    # mdistiller's log(sum(softmax)) gives -inf here; ours must stay finite with finite gradients.
    s = t(np.array([[200.0, 0.0, 0.0], [0.0, -150.0, 150.0]]), grad=True)
    tt = t(np.array([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0]]))
    value = build_loss("dkd", temperature=1.0, warmup=0)(s, tt, torch.tensor([0, 2]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def _hint_reference(s_logits: np.ndarray, t_logits: np.ndarray, s_feat: np.ndarray, t_feat: np.ndarray,
                    w: np.ndarray, b: np.ndarray, alpha: float, beta: float, temp: float) -> float:
    adapted = np.einsum("oc,bchw->bohw", w, s_feat) + b[None, :, None, None]
    hint = float(np.mean((adapted - t_feat) ** 2))
    return (1 - alpha) * np_ce(s_logits, Y) + alpha * np_kd_term(s_logits, t_logits, temp) + beta * hint


def _bound_hint(s_ch: int, t_ch: int, **hp: float):  # noqa: ANN202
    loss = build_loss("hint", **hp)
    loss.bind_features(s_ch, t_ch)
    rng = np.random.default_rng(1)
    w = rng.normal(size=(t_ch, s_ch))
    b = rng.normal(size=t_ch)
    with torch.no_grad():
        loss.adapter.weight.copy_(torch.tensor(w).view(t_ch, s_ch, 1, 1))
        loss.adapter.bias.copy_(torch.tensor(b))
    return loss, w, b


@pytest.mark.parametrize("alpha,beta,temp", [(0.5, 1.0, 4.0), (0.0, 2.0, 1.0), (1.0, 0.0, 2.0)])
def test_hint_value_same_size(alpha: float, beta: float, temp: float) -> None:
    rng = np.random.default_rng(2)
    sf, tf = rng.normal(size=(3, 2, 2, 2)), rng.normal(size=(3, 5, 2, 2))
    loss, w, b = _bound_hint(2, 5, alpha=alpha, beta=beta, temperature=temp)
    expected = _hint_reference(S, T, sf, tf, w, b, alpha, beta, temp)
    assert close(loss(t(S), t(T), y(), student_features=t(sf), teacher_features=t(tf)), expected)


def test_hint_pools_student_to_teacher_size() -> None:
    rng = np.random.default_rng(3)
    sf, tf = rng.normal(size=(3, 2, 4, 4)), rng.normal(size=(3, 3, 2, 2))
    pooled = sf.reshape(3, 2, 2, 2, 2, 2).mean(axis=(3, 5))  # 2x2 block means
    loss, w, b = _bound_hint(2, 3)
    expected = _hint_reference(S, T, pooled, tf, w, b, 0.5, 1.0, 4.0)
    assert close(loss(t(S), t(T), y(), student_features=t(sf), teacher_features=t(tf)), expected)


def test_hint_accepts_vector_features() -> None:
    rng = np.random.default_rng(4)
    sf, tf = rng.normal(size=(3, 2)), rng.normal(size=(3, 3))
    loss, w, b = _bound_hint(2, 3)
    expected = _hint_reference(S, T, sf[:, :, None, None], tf[:, :, None, None], w, b, 0.5, 1.0, 4.0)
    assert close(loss(t(S), t(T), y(), student_features=t(sf), teacher_features=t(tf)), expected)
    # a [B,C,H,W] student map against a [B,C] teacher vector: pooled to 1x1
    sf4 = rng.normal(size=(3, 2, 3, 3))
    expected = _hint_reference(S, T, sf4.mean(axis=(2, 3))[:, :, None, None], tf[:, :, None, None], w, b,
                               0.5, 1.0, 4.0)
    assert close(loss(t(S), t(T), y(), student_features=t(sf4), teacher_features=t(tf)), expected)


def test_hint_alpha_zero_needs_no_teacher_logits() -> None:
    loss, _, _ = _bound_hint(2, 3, alpha=0.0)
    value = loss(t(S), None, y(), student_features=torch.randn(3, 2, 2, 2), teacher_features=torch.randn(3, 3, 2, 2))
    assert value.dim() == 0


def test_hint_requires_bind_features() -> None:
    loss = build_loss("hint")
    with pytest.raises(RuntimeError, match="bind_features"):
        loss(t(S), t(T), y(), student_features=torch.randn(3, 2, 2, 2), teacher_features=torch.randn(3, 3, 2, 2))


def test_hint_adapter_params_exist_after_bind() -> None:
    loss = build_loss("hint")
    assert list(loss.parameters()) == []
    loss.bind_features(8, 16)
    assert sum(p.numel() for p in loss.parameters()) == 8 * 16 + 16
    build_loss("kd").bind_features(8, 16)  # no-op for non-feature losses


# --- gradients and shapes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ce", "kd", "mse", "dkd", "hint"])
def test_scalar_and_gradients_flow(name: str) -> None:
    loss = build_loss(name)
    loss.bind_features(2, 3)
    s = t(S, grad=True)
    teacher = t(T, grad=True)
    sf = torch.randn(3, 2, 2, 2, requires_grad=True)
    value = loss(s, teacher, y(), epoch=10, student_features=sf, teacher_features=torch.randn(3, 3, 2, 2))
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert teacher.grad is None  # teacher outputs are detached
    if name == "hint":
        assert loss.adapter.weight.grad is not None and loss.adapter.weight.grad.abs().sum() > 0
        assert sf.grad is not None and sf.grad.abs().sum() > 0


# --- bad input --------------------------------------------------------------------------------------------

def test_unknown_loss_suggests_close_match() -> None:
    with pytest.raises(ValueError) as exc:
        build_loss("dkdd")
    msg = str(exc.value)
    assert "dkdd" in msg and "did you mean 'dkd'" in msg
    for name in ("ce", "kd", "mse", "dkd", "hint"):
        assert name in msg


@pytest.mark.parametrize(
    "name,hp,bad",
    [
        ("kd", {"temperature": 0}, "temperature=0"),
        ("kd", {"temperature": -1.5}, "temperature=-1.5"),
        ("kd", {"alpha": 1.2}, "alpha=1.2"),
        ("kd", {"alpha": -0.1}, "alpha=-0.1"),
        ("mse", {"alpha": 2}, "alpha=2"),
        ("dkd", {"beta": -1}, "beta=-1"),
        ("dkd", {"warmup": -5}, "warmup=-5"),
        ("dkd", {"temperature": 0.0}, "temperature=0.0"),
        ("dkd", {"alpha": 1.5}, "alpha=1.5"),
        ("hint", {"beta": -0.5}, "beta=-0.5"),
        ("hint", {"alpha": 3}, "alpha=3"),
        ("hint", {"temperature": float("nan")}, "temperature=nan"),
        ("kd", {"temperature": "hot"}, "temperature='hot'"),
        ("kd", {"alpha": True}, "alpha=True"),
    ],
)
def test_bad_hyperparameter_value(name: str, hp: dict, bad: str) -> None:
    wrong_type = isinstance(next(iter(hp.values())), (bool, str))  # not a number at all: TypeError
    with pytest.raises(TypeError if wrong_type else ValueError) as exc:
        build_loss(name, **hp)
    msg = str(exc.value)
    assert name in msg and bad in msg
    key = next(iter(hp))
    valid = {"temperature": "> 0", "alpha": "[0, 1]", "beta": ">= 0", "warmup": ">= 0"}[key]
    assert valid in msg


@pytest.mark.parametrize(
    "name,key,suggest",
    [("kd", "temp", "temperature"), ("dkd", "gamma", None), ("mse", "temperature", None), ("hint", "betta", "beta")],
)
def test_unknown_hyperparameter(name: str, key: str, suggest: str | None) -> None:
    with pytest.raises(ValueError) as exc:
        build_loss(name, **{key: 1.0})
    msg = str(exc.value)
    assert repr(name) in msg and repr(key) in msg
    for valid in build_loss(name).hparams:
        assert valid in msg
    if suggest:
        assert f"did you mean {suggest!r}" in msg


def test_ce_takes_no_hyperparameters() -> None:
    with pytest.raises(ValueError, match="'ce'.*'alpha'.*no hyperparameters"):
        build_loss("ce", alpha=0.5)

from __future__ import annotations

from collections import Counter
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from autokd.model.data import TrainViews, load_dataset
from autokd.model.losses import build_loss
from autokd.model.teacher import CachedTeacherOutputs, OnlineTeacherOutputs
from autokd.model.train import EpochResult, NonFiniteLossError, TrainConfig, distill, evaluate


class TinyNet(nn.Module):
    """A few-hundred-parameter CNN with timm's forward_features/forward_head/num_features interface."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 8, nan: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, width, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 16, num_classes)
        self.num_features = width
        self.nan = nan

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        out = self.fc(F.adaptive_avg_pool2d(f, 4).flatten(1))
        return out * float("nan") if self.nan else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", input_size=16, train_limit=120)


def _student(seed: int = 0, **kw) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kw)


CFG = TrainConfig(epochs=2, batch_size=32, lr=0.02)


def test_distill_learns_and_reports_every_epoch(data) -> None:
    seen: list[EpochResult] = []
    result = distill(_student(), build_loss("ce"), data, CFG, on_epoch=seen.append)
    assert [r.epoch for r in seen] == [1, 2] and result.epochs == seen
    assert result.val_acc == seen[-1].val_acc > 0.3  # chance is 0.1
    assert result.best_val_acc == max(r.val_acc for r in seen)
    assert result.teacher_mode == "none" and result.seconds > 0
    assert seen[1].train_loss < seen[0].train_loss
    assert 0 < seen[1].lr < seen[0].lr < CFG.lr  # cosine, per step


def test_distill_is_deterministic(data) -> None:
    views = TrainViews(num_views=2, max_shift=1)

    def run(seed: int) -> list[tuple[float, float]]:
        cfg = TrainConfig(epochs=2, batch_size=32, lr=0.02, seed=seed)
        r = distill(_student(), build_loss("ce"), data, cfg, views=views)
        return [(e.train_loss, e.val_acc) for e in r.epochs]

    first = run(0)
    assert run(0) == first
    assert run(1) != first


def test_sgd_and_bad_optimizer(data) -> None:
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, optimizer="sgd")
    assert distill(_student(), build_loss("ce"), data, cfg).epochs[0].train_loss > 0
    with pytest.raises(ValueError, match="adamw"):
        distill(_student(), build_loss("ce"), data, TrainConfig(optimizer="lion"))


def test_fused_optimizer_with_fallback(data, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused AdamW (the default where torch has it) trains like the per-tensor one; a torch or device
    without a fused implementation falls back to the default instead of failing."""
    from autokd.model import train

    params = [{"params": [nn.Parameter(torch.zeros(3, 3))]}]
    assert train._make_optimizer("adamw", params, 0.1).defaults["fused"]
    fused = distill(_student(), build_loss("ce"), data, CFG).epochs

    class NoFusedAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs) -> None:
            if kwargs.get("fused"):
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", NoFusedAdamW)
    assert not train._make_optimizer("adamw", params, 0.1).defaults["fused"]
    plain = distill(_student(), build_loss("ce"), data, CFG).epochs
    for a, b in zip(fused, plain):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-3)


def test_non_finite_loss_names_epoch_and_step(data) -> None:
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 1\b"):
        distill(_student(nan=True), build_loss("ce"), data, CFG)


def test_on_epoch_exception_propagates(data) -> None:
    class Stop(Exception):
        pass

    calls: list[int] = []

    def on_epoch(r: EpochResult) -> None:
        calls.append(r.epoch)
        raise Stop

    with pytest.raises(Stop):
        distill(_student(), build_loss("ce"), data, CFG, on_epoch=on_epoch)
    assert calls == [1]


def test_kd_from_cached_teacher(data) -> None:
    # A "teacher" that is sure of the true label: KD alone must teach the student the labels.
    logits = F.one_hot(data.y_train, 10).float()[None] * 8
    teacher = CachedTeacherOutputs(logits)
    result = distill(_student(), build_loss("kd", alpha=1.0, temperature=2.0), data, CFG, teacher=teacher)
    assert result.teacher_mode == "cached" and result.val_acc > 0.3
    with pytest.raises(ValueError, match="teacher"):
        distill(_student(), build_loss("kd"), data, CFG)


def test_hint_loss_trains_adapter_with_online_teacher(data) -> None:
    torch.manual_seed(1)
    teacher = OnlineTeacherOutputs(TinyNet(width=12), need_features=True)
    loss_fn = build_loss("hint", alpha=0.5, beta=1.0)
    result = distill(_student(), loss_fn, data, TrainConfig(epochs=1, batch_size=32), teacher=teacher)
    assert result.teacher_mode == "online"
    assert loss_fn.adapter.in_channels == 8 and loss_fn.adapter.out_channels == 12
    assert loss_fn.adapter.weight.grad is None  # released at the end
    assert torch.isfinite(torch.tensor(result.epochs[0].train_loss))


def test_evaluate(data) -> None:
    model = _student()
    model.train()
    acc = evaluate(model, data.x_val, data.y_val, batch_size=7)
    assert 0.0 <= acc <= 1.0 and model.training
    preds = model.eval()(data.x_val).argmax(1)
    assert acc == pytest.approx((preds == data.y_val).float().mean().item())


@pytest.mark.slow
def test_compiled_training_matches_eager(data) -> None:
    """`--compile` (torch.compile, inductor) on the CPU: the same code path a GPU run takes, giving the same
    training as eager to float tolerance. Inductor needs a C compiler on the CPU."""
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("torch.compile's inductor backend needs a C compiler (cc/gcc) on the CPU; none installed")
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.02)
    eager = distill(_student(), build_loss("ce"), data, cfg).epochs
    compiled_cfg = TrainConfig(epochs=2, batch_size=32, lr=0.02, compile=True)
    compiled = distill(_student(), build_loss("ce"), data, compiled_cfg).epochs
    assert [e.epoch for e in compiled] == [1, 2]
    for a, b in zip(eager, compiled):
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-4)
        assert abs(b.val_acc - a.val_acc) <= 0.05  # a few borderline images may flip


# ----------------------------------------------------------------------------------------------------------
# no host read inside an epoch's steps
# ----------------------------------------------------------------------------------------------------------

# Python-level ways of reading a tensor back to the host; on a GPU each one waits for the device.
_HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


class _DeviceReads(TorchDispatchMode):
    """Counts the ATen ops whose result needs a device value on the host (any `.item()`, also from C++, and
    ops whose output size depends on the data)."""

    OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave")

    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        if name in self.OPS:
            self.counts[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


def _count_host_reads(monkeypatch: pytest.MonkeyPatch, run: Callable[[], object]) -> Counter:
    counts: Counter = Counter()
    with monkeypatch.context() as m:
        for name in _HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _name=name, _original=original, **kwargs):  # noqa: ANN001, ANN202
                counts[_name] += 1
                return _original(self, *args, **kwargs)

            m.setattr(torch.Tensor, name, counted)
        with _DeviceReads(counts):
            run()
    return counts


def test_no_host_read_inside_an_epoch(data, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The steps of an epoch read nothing back to the host: the reads per epoch are the same for 2 steps as for
    12 (the epoch end's: the loss buffer and the validation accuracy). Covers a KD loss with cached teacher
    outputs, augmented views and the latency gate's pause point after every step."""
    from autokd.utils.locks import CpuGate

    logits = F.one_hot(data.y_train, 10).float()[None].repeat(2, 1, 1) * 8
    views = TrainViews(num_views=2, max_shift=1)
    gate = CpuGate(tmp_path / "locks", slice_s=0.0)  # slice 0: every pause point leaves and re-enters the gate

    def run(batch_size: int) -> Counter:
        cfg = TrainConfig(epochs=2, batch_size=batch_size, lr=0.02)

        def train() -> None:
            with gate.training() as hold:
                distill(_student(), build_loss("kd", alpha=0.5, temperature=4.0), data, cfg,
                        teacher=CachedTeacherOutputs(logits), views=views, on_step=hold.pause_point)

        return _count_host_reads(monkeypatch, train)

    n = len(data.y_train)
    few, many = run(batch_size=n // 2), run(batch_size=n // 12)
    assert few == many, f"host reads grow with the steps of an epoch: 2 steps {dict(few)}, 12 steps {dict(many)}"
    assert sum(few.values()) <= 2 * 4, dict(few)  # per epoch: the loss buffer, the validation accuracy


def test_non_finite_loss_found_after_the_fact_names_its_step(data) -> None:
    """The NaN guard reads the epoch's losses at its end and names the first non-finite step exactly."""

    class LateNaN(TinyNet):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            if self.training:
                LateNaN.calls += 1
                if LateNaN.calls >= 7:  # epoch 2 (4 steps each), its 3rd step
                    return out * float("inf")
            return out

    torch.manual_seed(0)
    seen: list[EpochResult] = []
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3 of 4 \(lr "):
        distill(LateNaN(), build_loss("ce"), data, CFG, on_epoch=seen.append)
    assert [r.epoch for r in seen] == [1]  # epoch 2 never reached its callback (no pruning decision on NaN)

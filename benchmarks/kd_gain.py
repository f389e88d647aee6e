"""Benchmark: does distillation help? The same student trained with ce, kd and dkd over several seeds.

Digits with a reduced training set (where a teacher's soft labels matter most), the default digits teacher
(trained once on the full training split, cached), a small resnet student, same recipe for every loss.
Prints mean +- std test accuracy per loss. KD must not lose to ce.

    python benchmarks/kd_gain.py [--seeds 5] [--train-limit 200] [--epochs 15]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WARM_TEACHERS  # noqa: E402

LOSSES = {"ce": {}, "kd": {"temperature": 4.0, "alpha": 0.9}, "dkd": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0,
                                                                     "warmup": 5}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--train-limit", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    import torch

    from autokd.model.data import TrainViews, load_dataset
    from autokd.model.losses import build_loss
    from autokd.model.students import build_from_spec, resolve_student
    from autokd.model.teacher import get_teacher, teacher_outputs
    from autokd.model.train import TrainConfig, distill, evaluate

    full = load_dataset("digits", input_size=16)
    teacher = get_teacher(full, cache_root=WARM_TEACHERS)
    data = load_dataset("digits", input_size=16, train_limit=args.train_limit)
    outputs = teacher_outputs(teacher, data, TrainViews(0), cache_root=WARM_TEACHERS)
    print(f"teacher {teacher.arch}: test acc {teacher.test_acc:.4f}; students train on {len(data.y_train)} images")
    accs: dict[str, list[float]] = {name: [] for name in LOSSES}
    spec = resolve_student("resnet", 0.5, 0.5, data.num_classes, data.in_chans, data.input_size)
    for seed in range(args.seeds):
        for name, hparams in LOSSES.items():
            torch.manual_seed(seed)
            student = build_from_spec(spec)
            cfg = TrainConfig(epochs=args.epochs, batch_size=32, lr=5e-3, seed=seed)
            loss = build_loss(name, **hparams)
            distill(student, loss, data, cfg, teacher=outputs if loss.uses_teacher else None)
            accs[name].append(evaluate(student, data.x_test, data.y_test))
        print(f"seed {seed}: " + ", ".join(f"{n} {a[-1]:.4f}" for n, a in accs.items()), flush=True)
    for name, values in accs.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:>4}: test acc {statistics.mean(values):.4f} +- {std:.4f} over {len(values)} seeds")
    kd_ok = statistics.mean(accs["kd"]) >= statistics.mean(accs["ce"])
    print(f"kd >= ce: {kd_ok}; dkd >= ce: {statistics.mean(accs['dkd']) >= statistics.mean(accs['ce'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

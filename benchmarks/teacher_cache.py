"""Benchmark 1: trial time with the cached teacher outputs versus the online teacher (target >= 2x faster).

Default digits teacher, a typical student (resnet, width 0.5, depth 0.5, KD T=4 alpha=0.9, 6 epochs,
batch 64) trained in one run, same seed: reading the teacher's logits from the cache, and running the teacher on
every batch. The two arms alternate, twice each (cached, online, cached, online), and each arm's faster run
counts, so neither pays alone for first-run costs (allocator, oneDNN kernel creation) or a noisy moment.
Also checks both paths give the same first-epoch loss.

The cache removes the teacher's forward pass and nothing else, so the speed-up is bounded by
(student step + teacher forward) / student step. The script also times the teacher's forward alone over one
trial's batches and prints that bound, and repeats the comparison with a larger teacher (``--big-teacher``,
untrained: its weights do not change its speed) to show how the gain grows with the teacher's cost.

    python benchmarks/teacher_cache.py [--big-teacher resnet26]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WARM_TEACHERS  # noqa: E402

EPOCHS, BATCH = 6, 64


def _compare(label: str, teacher_model: Any, cached: Any, data: Any, views: Any) -> float:
    import torch

    from autokd.model.losses import build_loss
    from autokd.model.students import build_from_spec, resolve_student
    from autokd.model.teacher import OnlineTeacherOutputs
    from autokd.model.train import TrainConfig, distill

    online = OnlineTeacherOutputs(teacher_model)
    cfg = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=5e-3, seed=0)
    results: dict[str, tuple[float, Any]] = {}
    spec = resolve_student("resnet", 0.5, 0.5, data.num_classes, data.in_chans, data.input_size)
    for name, outputs in (("cached", cached), ("online", online)) * 2:
        torch.manual_seed(0)
        student = build_from_spec(spec)
        started = time.perf_counter()
        result = distill(student, build_loss("kd", temperature=4.0, alpha=0.9), data, cfg, teacher=outputs, views=views)
        seconds = time.perf_counter() - started
        print(f"  {name:>6}: {seconds:.2f} s for {cfg.epochs} epochs, val acc {result.val_acc:.4f}, "
              f"epoch-1 loss {result.epochs[0].train_loss:.6f}", flush=True)
        if name not in results or seconds < results[name][0]:
            results[name] = (seconds, result)

    # The teacher's forward alone, on the batches one trial feeds it (NHWC, as the loop does), best of two.
    x = data.x_train.contiguous(memory_format=torch.channels_last)
    teacher_s = []
    for _ in range(2):
        started = time.perf_counter()
        for _epoch in range(EPOCHS):
            for i in range(0, len(x), BATCH):
                online.logits(x[i:i + BATCH], None, 0)
        teacher_s.append(time.perf_counter() - started)
    cached_s, online_s = results["cached"][0], results["online"][0]
    ratio = online_s / cached_s
    bound = (cached_s + min(teacher_s)) / cached_s
    same = abs(results["online"][1].epochs[0].train_loss - results["cached"][1].epochs[0].train_loss) < 1e-4
    print(f"{label}: teacher cache speed-up {ratio:.2f}x; teacher forward alone {min(teacher_s):.2f} s of the "
          f"online trial's {online_s:.2f} s (bound (trial + teacher) / trial = {bound:.2f}x); same loss on both "
          f"paths: {same}", flush=True)
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-teacher", default="resnet26", help="the larger teacher of the second comparison")
    args = parser.parse_args()

    from autokd.model.data import TrainViews, load_dataset
    from autokd.model.teacher import (
        CachedTeacherOutputs,
        _compute_outputs,
        _create,
        _ready,
        get_teacher,
        teacher_outputs,
    )

    data = load_dataset("digits", input_size=16)
    views = TrainViews(0)
    teacher = get_teacher(data, cache_root=WARM_TEACHERS)
    print(f"default teacher {teacher.arch}:")
    ratio = _compare(f"default teacher {teacher.arch}", teacher.model,
                     teacher_outputs(teacher, data, views, cache_root=WARM_TEACHERS), data, views)

    big = _ready(_create(args.big_teacher, data), "cpu")
    stored = _compute_outputs(big, data, views, "cpu", need_features=False, batch_size=256)
    print(f"larger teacher {args.big_teacher} (untrained):")
    big_ratio = _compare(f"teacher {args.big_teacher}", big, CachedTeacherOutputs(stored["logits"]), data, views)
    print(f"teacher cache speed-up: {ratio:.2f}x with the default teacher (target >= 2x), {big_ratio:.2f}x with "
          f"{args.big_teacher}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

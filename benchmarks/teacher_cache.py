"""Benchmark 1: trial time with the cached teacher outputs versus the online teacher (target >= 2x faster).

Default digits teacher, a typical student (resnet, width 0.5, depth 0.5, KD T=4 alpha=0.9, 6 epochs,
batch 64) trained in one run, same seed: reading the teacher's logits from the cache, and running the teacher on
every batch. The two arms alternate, twice each (cached, online, cached, online), and each arm's faster run
counts, so neither pays alone for first-run costs (allocator, oneDNN kernel creation) or a noisy moment.
Also checks both paths give the same first-epoch loss.

    python benchmarks/teacher_cache.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WARM_TEACHERS  # noqa: E402


def main() -> int:
    import torch

    from autokd.data import TrainViews, load_dataset
    from autokd.losses import build_loss
    from autokd.students import build_student
    from autokd.teacher import OnlineTeacherOutputs, get_teacher, teacher_outputs
    from autokd.train import TrainConfig, distill

    data = load_dataset("digits", input_size=16)
    teacher = get_teacher(data, cache_root=WARM_TEACHERS)
    views = TrainViews(0)
    cached = teacher_outputs(teacher, data, views, cache_root=WARM_TEACHERS)
    online = OnlineTeacherOutputs(teacher.model)
    cfg = TrainConfig(epochs=6, batch_size=64, lr=5e-3, seed=0)
    results: dict[str, tuple[float, object]] = {}
    for name, outputs in (("cached", cached), ("online", online)) * 2:
        torch.manual_seed(0)
        student = build_student("resnet", 0.5, 0.5, data.num_classes, data.in_chans, data.input_size)
        started = time.perf_counter()
        result = distill(student, build_loss("kd", temperature=4.0, alpha=0.9), data, cfg, teacher=outputs, views=views)
        seconds = time.perf_counter() - started
        print(f"{name:>6}: {seconds:.2f} s for {cfg.epochs} epochs, val acc {result.val_acc:.4f}, "
              f"epoch-1 loss {result.epochs[0].train_loss:.6f}", flush=True)
        if name not in results or seconds < results[name][0]:
            results[name] = (seconds, result)
    ratio = results["online"][0] / results["cached"][0]
    same = abs(results["online"][1].epochs[0].train_loss - results["cached"][1].epochs[0].train_loss) < 1e-4
    print(f"teacher cache speed-up: {ratio:.2f}x (target >= 2x); same loss on both paths: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

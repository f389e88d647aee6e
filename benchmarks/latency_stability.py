"""Benchmark 5: latency re-measurement spread for 5 architectures (target: medians within +-5%).

Each architecture is measured twice, uncached, in one run (batch 1, 1 thread, 16x16 digits input).

    python benchmarks/latency_stability.py
"""
from __future__ import annotations

import sys

ARCHS = [("resnet", 0.5, 0.5), ("mobilenetv3", 0.5, 0.5), ("regnet", 0.5, 0.5), ("convnext", 0.5, 0.5),
         ("vit", 0.75, 0.5)]


def main() -> int:
    from autokd.latency.meter import measure_latency
    from autokd.model.students import build_student

    worst = 0.0
    for family, width, depth in ARCHS:
        model = build_student(family, width, depth, num_classes=10, in_chans=1, input_size=16)
        first = measure_latency(model, (1, 16, 16))
        second = measure_latency(model, (1, 16, 16))
        diff = (second.median_ms - first.median_ms) / first.median_ms
        worst = max(worst, abs(diff))
        print(f"{family:<12} w={width} d={depth}: {first.median_ms:.3f} ms (IQR {first.iqr_ms:.3f}) then "
              f"{second.median_ms:.3f} ms (IQR {second.iqr_ms:.3f}): {diff:+.1%}")
    print(f"largest re-measurement difference: {worst:.1%} (target <= 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: INT8 versus fp32 for every student on the front of a default search.

Per front member, from one run: `autokd export --int8` (the real export: ONNX Runtime static quantisation
calibrated on 256 training images), then fp32 and int8 test accuracy (ONNX Runtime, full test split), the
share of test images where both predict the same class, file sizes, and latency: all fp32 and int8 files of
the front re-timed together at the end, interleaved in shuffled rounds in this one process (ONNX Runtime,
batch 1, 1 thread; minimum per round, median over rounds), so a noisy host's slow phases hit every file alike.
Families absent from the front are represented by their most accurate COMPLETE student (marked "off front"),
so the median int8/fp32 latency ratio is printed for every family the study trained. Target: every front
member within 1 point of its fp32 accuracy.

Then, to show where INT8 pays: untrained students of each family's base size (width and depth 1.0)
quantised for timing (`autokd.latency.quantize.quantize_for_latency`), fp32 vs int8 at batch 1 and batch 32, at the
study's input size and at 4x that side.

    python benchmarks/int8.py                       # runs a default search first (--budget 50)
    python benchmarks/int8.py --budget 12           # a smaller search
    python benchmarks/int8.py --study NAME [--root studies] [--storage URL]   # an existing study
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fresh_root, load_study, run_search  # noqa: E402


def _latency_ms(files: list, x: Any) -> list[float]:
    """Median latency (ms) of each ONNX file at x's batch size, timed together with the search's protocol."""
    from autokd.export.int8 import _ort_latency

    return [t.median_ms for t in _ort_latency(files, batch=int(x.shape[0]))]


def _cpu() -> str:
    from autokd.latency.protocol import cpu_model

    return cpu_model()


def _scaling(study, data, folder: Path, time_files, quantize) -> None:  # noqa: ANN001
    """fp32 vs int8 latency of each family's base-size student, batch 1 and 32, at 1x and 4x the input side."""
    import torch

    from autokd.latency.onnx_export import export_onnx
    from autokd.model.students import build_from_spec, resolve_student

    space = study.user_attrs.get("space") or {}
    size = int(study.user_attrs.get("input_size") or data.input_size)
    fams = sorted(space.get("students") or ["resnet", "mobilenetv3", "regnet", "convnext", "vit"])
    print("\n== where INT8 pays: width 1.0, depth 1.0 students (untrained), int8/fp32 latency ratio "
          "(< 1 = INT8 faster), 1 thread ==")
    print("| family | input | fp32 ms batch 1 | int8/fp32 batch 1 | fp32 ms batch 32 | int8/fp32 batch 32 |")
    print("|---|---|---|---|---|---|")
    for family in fams:
        for side in (size, 4 * size):
            try:
                model = build_from_spec(resolve_student(family, 1.0, 1.0, data.num_classes, data.in_chans, side)).eval()
                x = torch.randn(32, data.in_chans, side, side)
                blob = export_onnx(model, x[:2])[0]
                q = quantize(blob, (data.in_chans, side, side))
            except Exception as exc:  # noqa: BLE001 - a family that cannot be built at this size is reported
                print(f"| {family} | {side}px | {exc.__class__.__name__}: {str(exc)[:80]} | | | |")
                continue
            a, b = folder / f"{family}-{side}.onnx", folder / f"{family}-{side}.int8.onnx"
            a.write_bytes(blob)
            b.write_bytes(q)
            one = time_files([a, b], x[:1].numpy())
            many = time_files([a, b], x.numpy())
            print(f"| {family} | {side}px | {one[0]:.4f} | {one[1] / one[0]:.2f} | {many[0]:.3f} "
                  f"| {many[1] / many[0]:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", help="use this existing study instead of running a search")
    parser.add_argument("--root", type=Path, default=Path("studies"), help="outputs root of --study (default studies)")
    parser.add_argument("--storage", help="Optuna storage of --study (default: the journal under --root)")
    parser.add_argument("--budget", type=int, default=50, help="trials of the search run when no --study (default 50)")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--keep", action="store_true", help="keep the search root and the exports")
    args = parser.parse_args()

    import onnxruntime as ort

    from autokd.export.int8 import Int8Options
    from autokd.export.student import export_trial
    from autokd.latency.quantize import quantize_for_latency
    from autokd.report.build import resolve_study, study_data, trial_points
    from autokd.select.pareto import front_points

    started = time.perf_counter()
    own_root = None
    if args.study:
        root = args.root
        study = resolve_study(args.study, args.storage, root)
    else:
        own_root = root = fresh_root("int8")
        run_search(root, quiet=True, budget=args.budget)
        study = load_study(root)
    search_s = time.perf_counter() - started
    data = study_data(study)
    points = trial_points(study)
    front = sorted(front_points(points), key=lambda p: p.latency_ms)
    families = {p.params.get("family") for p in front}
    extra = {}
    for p in sorted((p for p in points if p.state == "COMPLETE"), key=lambda p: -p.val_acc):
        family = p.params.get("family")
        if family not in families and family not in extra:
            extra[family] = p
    on_front = {p.number for p in front}
    chosen = front + sorted(extra.values(), key=lambda p: p.latency_ms)
    exports = Path(tempfile.mkdtemp(prefix="autokd-bench-int8-exports-"))
    options = Int8Options(calibration_images=args.calibration_images)
    rows = []
    for p in chosen:
        result = export_trial(study, p.number, root, exports / str(p.number), ["onnx"], data=data,
                              why="benchmark", storage=args.storage, int8=options)
        rows.append((p, result.config))
    # Every file of the front timed together: the ratios compare like with like on a noisy host.
    files = [exports / str(p.number) / name for p, _ in rows for name in ("model.onnx", "model.int8.onnx")]
    latencies = _latency_ms(files, data.x_test[:1].numpy())

    print(f"\n== INT8 vs fp32 on the front of study {study.study_name!r} ({len(front)} students; "
          f"{len(extra)} more families off the front) ==")
    print(f"date {time.strftime('%Y-%m-%d %H:%M')} UTC; CPU {_cpu()}, {os.cpu_count()} cores; load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; onnxruntime {ort.__version__}; "
          f"{'search' if own_root else 'study loaded'} in {search_s:.0f} s; calibration {options.calibration_images} "
          f"training images; test split {len(data.y_test)} images")
    print("\n| trial | family | student | fp32 test acc | int8 test acc | drop (points) | same prediction "
          "| fp32 ms | int8 ms | int8/fp32 latency | fp32 kB | int8 kB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ratios: dict[str, list[float]] = {}
    worst_drop = 0.0
    for i, (p, cfg) in enumerate(rows):
        q = cfg["int8"]
        fp32_ms, int8_ms = latencies[2 * i], latencies[2 * i + 1]
        family = cfg["student"].get("family", "?")
        ratios.setdefault(family, []).append(int8_ms / fp32_ms)
        if p.number in on_front:
            worst_drop = max(worst_drop, q["drop_pp"])
        where = "" if p.number in on_front else " (off front)"
        student = cfg["student"].get("key", cfg["architecture"])
        print(f"| {p.number}{where} | {family} | {student} | {q['fp32_test_acc']:.2%} "
              f"| {q['test_acc']:.2%} | {q['drop_pp']:+.2f} | {q['agreement']:.1%} | {fp32_ms:.4f} | {int8_ms:.4f} "
              f"| {int8_ms / fp32_ms:.2f} | {q['fp32_size_bytes'] / 1024:.1f} | {q['size_bytes'] / 1024:.1f} |")
    print("\nint8/fp32 latency ratio per family (median; < 1 = INT8 faster): "
          + ", ".join(f"{f} {statistics.median(r):.2f} (n={len(r)})" for f, r in sorted(ratios.items())))
    print(f"largest accuracy drop on the front: {worst_drop:.2f} points — "
          + ("target met (every front member within 1 point)" if worst_drop <= 1.0 else "target NOT met (> 1 point)"))
    _scaling(study, data, exports, _latency_ms, quantize_for_latency)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.keep:
        print(f"exports kept in {exports}" + (f"; search root {own_root}" if own_root else ""))
    else:
        shutil.rmtree(exports, ignore_errors=True)
        if own_root is not None:
            shutil.rmtree(own_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

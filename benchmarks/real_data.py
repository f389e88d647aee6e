"""Benchmark: autokd on real data (Fashion-MNIST, offline) against the students a practitioner picks by hand.

Prints, from one run on this machine (every figure measured in this run):
- (teacher) the default teacher trained once on the full training split: wall time, test accuracy
  (targets: <= 30 min on a 2-core CPU, >= 93 %);
- (a) `autokd search --dataset fashion-mnist --space fashion --budget B [--train-limit N]`: wall time with the
  teacher cached, trials complete/pruned, epochs saved by pruning (target: <= 60 min);
- (b) the front: members, latency span (slowest / fastest), members not tied with each other, each member's test
  accuracy evaluated once (targets: >= 5 members, >= 5x span, >= 3 untied; best >= 93 %);
- (c) hand-picked baselines trained with `autokd distill` for the search's longest trial's epochs: a resnet18-
  shaped student (resnet family, width 2, depth 1: resnet18's channels and blocks) with CE and with Hinton KD
  (T = 4, alpha = 0.9), and a full-size mobilenetv3-shaped student (width 1, depth 2) with the same KD; timed
  together with the front under the search's latency protocol, evaluated on the same test split;
- (d) for each baseline, the best front member at or below its latency and the accuracy difference (target:
  every baseline dominated: >= 1 point more accurate at <= its latency, or as accurate at <= half of it);
- (e) KD against CE on the front's architectures, same epochs, --seeds seeds each: mean and spread (target
  KD >= CE + 0.5 points);
- (f) the dataset authors' published table, for context;
- (g) the plain alternative: the same budget with `--sampler random --no-prune`, hypervolume of both at equal
  wall time, and the share of the random search's wall time autokd needs to reach its final hypervolume
  (target <= 25 %).

    python benchmarks/real_data.py                              # the full benchmark (hours on a 2-core CPU)
    python benchmarks/real_data.py --budget 8 --train-limit 2000 --kd-archs 1 --seeds 1   # a smoke run

Needs the files of Debian's `dataset-fashion-mnist` package (or --data-dir). No network.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

PUBLISHED = [("2 conv + pooling", 91.6), ("ResNet18 + augmentation", 94.9), ("MobileNet", 95.0),
             ("WRN40-4 (8.9 M parameters)", 96.7), ("Google AutoML Vision, 24 compute hours", 93.9)]
BASELINES = [("resnet18-shaped CE", "resnet", 2.0, 1.0, "ce"), ("resnet18-shaped KD", "resnet", 2.0, 1.0, "kd"),
             ("mobilenetv3-shaped KD", "mobilenetv3", 1.0, 2.0, "kd")]


def autokd(root: Path, *argv: str) -> tuple[float, str]:
    """Run one `autokd` command (the CLI a user runs); returns (wall seconds, output). Fails loudly.

    Its output also goes, as it comes, to ROOT/logs/NN-COMMAND.log, to follow a run of several hours."""
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{len(list(logs.iterdir())):02d}-{argv[0]}.log"
    started = time.perf_counter()
    with log.open("w") as sink:
        sink.write(f"$ autokd {' '.join(argv)}\n")
        sink.flush()
        done = subprocess.run([sys.executable, "-m", "autokd.cli", "--root", str(root), *argv], check=False, stdout=sink,
                              stderr=subprocess.STDOUT, text=True)
    output = log.read_text()
    if done.returncode != 0:
        raise SystemExit(f"autokd {' '.join(argv)} exited {done.returncode}:\n{output[-6000:]}")
    return time.perf_counter() - started, output


def load(root: Path, name: str) -> optuna.Study:
    from autokd.study.store import make_storage

    return optuna.load_study(study_name=name, storage=make_storage(None, root))


def hypervolume_over_time(study: optuna.Study, ref_ms: float) -> list[tuple[float, float]]:
    """(seconds since the study's first trial started, hypervolume of the COMPLETE trials finished by then)."""
    from autokd.select.pareto import hypervolume

    done = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                  key=lambda t: t.datetime_complete)
    start = min(t.datetime_start for t in study.trials if t.datetime_start)
    out, points = [], []
    for t in done:
        points.append((t.values[0], t.values[1]))
        out.append(((t.datetime_complete - start).total_seconds(), hypervolume(points, (0.0, ref_ms))))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--train-limit", type=int, default=5000,
                        help="training images the searches see (0: all); the teacher always trains on all")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm of the KD-vs-CE comparison")
    parser.add_argument("--kd-archs", type=int, default=3, help="front architectures in the KD-vs-CE comparison")
    parser.add_argument("--data-dir", help="the four IDX files (default: Debian's dataset-fashion-mnist)")
    parser.add_argument("--root", type=Path, help="outputs root (default: a new temporary folder)")
    parser.add_argument("--no-random", action="store_true", help="skip (g), the random-search arm")
    parser.add_argument("--teacher-epochs", type=int, help="train the teacher for this many epochs instead of the "
                        "dataset's recipe (a smoke run; the teacher target is about the recipe)")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="autokd-bench-real-"))
    data_args = ["--dataset", "fashion-mnist"] + (["--data-dir", args.data_dir] if args.data_dir else [])
    subset = ["--train-limit", str(args.train_limit)] if args.train_limit else []
    print(f"outputs under {root}", flush=True)

    # Teacher: trained once on all the training images, then cached for every later command.
    from autokd.model.data import load_dataset
    from autokd.model.teacher import default_recipe, default_teacher, get_teacher

    full = load_dataset("fashion-mnist", data_dir=args.data_dir)
    started = time.perf_counter()
    recipe = default_recipe("fashion-mnist")
    if args.teacher_epochs:
        recipe = dataclasses.replace(recipe, epochs=args.teacher_epochs)
    teacher = get_teacher(full, arch=default_teacher("fashion-mnist"), cache_root=root / "teachers", recipe=recipe)
    teacher_s = time.perf_counter() - started
    teacher_file = teacher.path
    print(f"teacher {teacher.arch}: {teacher_s:.0f} s, val {teacher.val_acc:.4f}, test {teacher.test_acc:.4f}",
          flush=True)
    teacher_args = ["--teacher", teacher.arch, "--teacher-checkpoint", str(teacher_file)]

    # (a) the search, teacher cached.
    name = "fashion-autokd"
    search_s, _ = autokd(root, "search", *data_args, "--space", "fashion", "--budget", str(args.budget), *subset,
                           *teacher_args, "--study", name, "--no-mlflow", "--seed", "0")
    study = load(root, name)
    counts: dict[str, int] = {}
    for t in study.trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    max_epochs = study.user_attrs["space"]["epochs"]
    trained = sum(len(t.user_attrs.get("curve", [])) for t in study.trials)
    finished = sum(counts.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL"))
    longest = max(len(t.user_attrs.get("curve", [])) for t in study.trials)
    views = int(study.user_attrs["space"].get("views", 0) or 0)

    # (b) the front, evaluated once on the test split (as `autokd report` does).
    from autokd import build_report

    report = build_report(name, root=root)
    front = sorted(report.front, key=lambda p: p.latency_ms)
    tied = set(report.ties)  # trial number -> the members it is tied with; untied members are not in it

    # Each part is printed as soon as it is measured: a late failure keeps what came before.
    print(f"\n== real data: Fashion-MNIST, {time.strftime('%Y-%m-%d')}, budget {args.budget}, "
          f"train subset {args.train_limit or 'all'} ==")
    print(f"teacher: {teacher.arch} trained once on 54,000 images in {teacher_s / 60:.1f} min (target <= 30), "
          f"test accuracy {teacher.test_acc:.2%} (target >= 93 %)")
    print(f"(a) search: {search_s / 60:.1f} min with the teacher cached (target <= 60); trials "
          + ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()))
          + f"; epochs trained {trained} of {max_epochs * finished} unpruned "
          f"({1 - trained / max(1, max_epochs * finished):.0%} saved)")
    span = front[-1].latency_ms / front[0].latency_ms if front else 0.0
    untied = sum(p.number not in tied for p in front)
    print(f"(b) front: {len(front)} members (target >= 5), latency span {span:.1f}x (target >= 5x), "
          f"{untied} not tied (target >= 3)", flush=True)
    for p in front:
        print(f"    trial {p.number:>3} {p.params['family']:<12} w {p.params['width']:.2f} d {p.params['depth']:.2f} "
              f"{p.params['loss']:<4} val {p.val_acc:.2%} test {p.test_acc:.2%} latency {p.latency_ms:.3f} ms")
    best = max((p.test_acc or 0 for p in front), default=0)
    print(f"    most accurate front member: {best:.2%} test (target >= 93 %)", flush=True)

    # (c) baselines, trained by hand with `autokd distill`, then timed together with the front.
    baselines = []
    for label, family, width, depth, loss in BASELINES:
        folder = root / "baselines" / label.replace(" ", "-")
        kd = ["--temperature", "4", "--alpha", "0.9"] if loss == "kd" else []
        seconds, _ = autokd(root, "distill", *data_args, *subset, *teacher_args, "--family", family, "--width",
                            str(width), "--depth", str(depth), "--loss", loss, *kd, "--epochs", str(longest),
                            "--views", str(views), "--lr", "0.003", "--batch-size", "128", "--out", str(folder))
        cfg = json.loads((folder / "config.json").read_text())
        baselines.append({"label": label, "family": family, "width": width, "depth": depth, "cfg": cfg,
                          "seconds": seconds})
    from autokd.latency.meter import LatencyMeter
    from autokd.model.students import resolve_student

    def spec(family: str, width: float, depth: float):
        return resolve_student(family, width, depth, num_classes=10, in_chans=1, input_size=28)

    specs = {f"front{p.number}": spec(p.params["family"], p.params["width"], p.params["depth"]) for p in front}
    specs.update({b["label"]: spec(b["family"], b["width"], b["depth"]) for b in baselines})
    timed = LatencyMeter("onnxruntime", "cpu", threads=1).retime(specs)

    print("(c, d) hand-picked baselines (same epochs, views, teacher and test split; lr 3e-3, batch 128, the dataset's "
          "teacher recipe), timed together with the front:")
    print("    front re-timed with them: " + ", ".join(f"#{p.number} {timed[f'front{p.number}'].median_ms:.3f} ms"
                                                   for p in front))
    dominated = 0
    for b in baselines:
        lat = timed[b["label"]].median_ms
        acc = b["cfg"]["test_acc"]
        under = [p for p in front if timed[f"front{p.number}"].median_ms <= lat]
        pick = max(under, key=lambda p: p.test_acc or 0, default=None)
        half = [p for p in front if timed[f"front{p.number}"].median_ms <= lat / 2 and (p.test_acc or 0) >= acc]
        won = pick is not None and (pick.test_acc or 0) >= acc + 0.01 or bool(half)
        dominated += won
        vs = (f"best front member at or below: trial {pick.number} {pick.test_acc:.2%} "
              f"({(pick.test_acc - acc) * 100:+.2f} points) at {timed[f'front{pick.number}'].median_ms:.3f} ms"
              if pick else "no front member at or below its latency")
        print(f"    {b['label']:<24} test {acc:.2%} latency {lat:.3f} ms; {vs}; dominated: {'yes' if won else 'no'}")
    print(f"    dominated: {dominated} of {len(baselines)} (target: all)", flush=True)

    # (e) KD against CE on the front's most accurate architectures, same epochs, several seeds.
    kd_rows = []
    for p in sorted(front, key=lambda p: -(p.test_acc or 0))[:args.kd_archs]:
        accs: dict[str, list[float]] = {"kd": [], "ce": []}
        for seed in range(args.seeds):
            for loss in ("kd", "ce"):
                kd = ["--temperature", "4", "--alpha", "0.9"] if loss == "kd" else []
                folder = root / "kd_vs_ce" / f"{p.number}-{loss}-{seed}"
                autokd(root, "distill", *data_args, *subset, *teacher_args, "--family", p.params["family"],
                       "--width", str(p.params["width"]), "--depth", str(p.params["depth"]), "--loss", loss, *kd,
                       "--epochs", str(longest), "--seed", str(seed), "--lr", str(p.params["lr"]),
                       "--batch-size", str(p.params["batch_size"]), "--views", str(views), "--out", str(folder))
                accs[loss].append(json.loads((folder / "config.json").read_text())["test_acc"])
        kd_rows.append((p, accs))

    print(f"(e) KD (T=4, alpha=0.9) vs CE, {args.seeds} seeds, {longest} epochs:")
    for p, accs in kd_rows:
        kd_m, ce_m = statistics.mean(accs["kd"]), statistics.mean(accs["ce"])
        spread = lambda xs: (max(xs) - min(xs)) * 100
        print(f"    trial {p.number} {p.params['family']}: KD {kd_m:.2%} (spread {spread(accs['kd']):.2f}) "
              f"CE {ce_m:.2%} (spread {spread(accs['ce']):.2f}): {(kd_m - ce_m) * 100:+.2f} points (target >= +0.5)")
    print("(f) published (test accuracy): " + "; ".join(f"{n} {a} %" for n, a in PUBLISHED), flush=True)

    # (h) the most accurate front member trained again on every training image (what a user does after a
    # search on a subset): `autokd distill --from-trial N`, the trial's own epochs.
    if front and args.train_limit:
        top = max(front, key=lambda p: p.test_acc or 0)
        folder = root / "from-trial" / str(top.number)
        seconds, _ = autokd(root, "distill", "--from-trial", str(top.number), "--study", name, *data_args[2:],
                            "--teacher-checkpoint", str(teacher_file), "--out", str(folder))
        acc = json.loads((folder / "config.json").read_text())["test_acc"]
        print(f"(h) trial {top.number} trained again on all 54,000 training images (autokd distill --from-trial): "
              f"test {acc:.2%} (on the subset {top.test_acc:.2%}), {seconds / 60:.1f} min", flush=True)

    # (g) the plain alternative: random sampling, no pruning, same budget and data.
    random_row = None
    if not args.no_random:
        random_s, _ = autokd(root, "search", *data_args, "--space", "fashion", "--budget", str(args.budget), *subset,
                             *teacher_args, "--study", "fashion-random", "--no-mlflow", "--seed", "0",
                             "--sampler", "random", "--no-prune")
        random_row = (random_s, load(root, "fashion-random"))

    if random_row is not None:
        random_s, random_study = random_row
        ref = max(t.values[1] for s in (study, random_study) for t in s.trials
                  if t.state == optuna.trial.TrialState.COMPLETE) * 1.1
        ours, theirs = hypervolume_over_time(study, ref), hypervolume_over_time(random_study, ref)
        final = theirs[-1][1] if theirs else 0.0
        reach = next((s for s, hv in ours if hv >= final), None)
        at_equal = min(search_s, random_s)
        hv_at = lambda curve, s: max([hv for t, hv in curve if t <= s], default=0.0)
        print(f"(g) random search (--sampler random --no-prune): {random_s / 60:.1f} min; hypervolume at equal wall "
              f"time ({at_equal / 60:.1f} min): autokd {hv_at(ours, at_equal):.4f}, random {hv_at(theirs, at_equal):.4f}; "
              + (f"autokd reaches random's final {final:.4f} after {reach:.0f} s = {reach / random_s:.0%} of random's "
                 f"wall time (target <= 25 %)" if reach is not None else
                 f"autokd never reaches random's final {final:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: is the front's latency axis what a user deploys, and does it repeat on a noisy host?

Prints, from one run (latency runtime: the CPU default, ONNX Runtime, 1 thread, batch 1):
(a) the same architectures (sampled from the default space) timed in two separate processes, each
    architecture alone with the per-trial protocol: worst and median relative difference (target worst <= 5 %);
(b) a default search's recorded latencies (each trial's own measurement) against an independent re-timing of
    the same students, all interleaved in shuffled rounds in one process: Spearman (target >= 0.98) and the
    worst / median relative difference;
(c) latency bookkeeping (ONNX export + timing, MACs and parameter count included) as a share of trial time in
    that search (target <= 5 %), with export and timing apart;
(d) Spearman between eager PyTorch and ONNX Runtime latencies of the (a) architectures (information);
(e) latency inside a search: two identical searches (16 trials, random sampler, no pruning, seed 0, no MLflow:
    the same 15 architectures), worst and median difference of the latencies they recorded (targets <= 10 %,
    <= 3 %) and Spearman against an independent interleaved re-timing (target >= 0.98), beside the host's own
    floor: that re-timing done twice back to back;
(f) the same search with a second process keeping one core busy, against the first quiet one (target worst
    <= 15 %); with the latency bookkeeping share of each search's trial time and a per-architecture table.

    python benchmarks/latency_validity.py [--quick] [--archs 30] [--budget 50] [--only ad|bc|ef]

--quick: 20 architectures and a 12-trial search (about a minute or two); the full run: 30 and the default
50-trial search (a few minutes); (e) and (f) take about ten minutes (the busy search trains slowly).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, cleanup, fresh_root, load_study, run_search  # noqa: E402

FAMILIES = ("resnet", "mobilenetv3", "regnet", "convnext", "vit")


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else float("nan")


def rel_diffs(a: list[float], b: list[float]) -> list[float]:
    """|a - b| / min(a, b) per pair."""
    return [abs(x - y) / min(x, y) for x, y in zip(a, b)]


def sample_specs(n: int, seed: int = 1) -> list:
    """``n`` architectures of the default space (width/depth ranges as in search_spaces/default.yaml)."""
    from autokd.model.students import resolve_student

    rng = random.Random(seed)
    out = []
    for i in range(n):
        family = FAMILIES[i % len(FAMILIES)]
        width = rng.uniform(0.5, 1.0) if family == "vit" else rng.uniform(0.25, 0.75)
        out.append(resolve_student(family, width, rng.uniform(0.25, 0.75), num_classes=10, in_chans=1,
                                   input_size=16))
    return out


def child(folder: Path, out: Path, seed: int) -> None:
    """(a) in a separate process: time every exported ONNX file of ``folder`` alone, in a shuffled order."""
    from autokd.latency.meter import LatencyMeter

    meter = LatencyMeter("onnxruntime")
    files = sorted(folder.glob("*.onnx"))
    random.Random(seed).shuffle(files)
    result = {f.stem: meter.time_onnx(f.read_bytes(), key=f.stem).median_ms for f in files}
    out.write_text(json.dumps(result))


def part_a_and_d(n: int) -> None:
    from autokd.latency.meter import LatencyMeter
    from autokd.model.students import build_from_spec

    specs = sample_specs(n)
    meter = LatencyMeter("onnxruntime")
    with tempfile.TemporaryDirectory(prefix="autokd-bench-validity-") as tmp:
        folder = Path(tmp)
        for spec in specs:
            (folder / f"{spec.key}.onnx").write_bytes(meter.export(build_from_spec(spec),
                                                                   (spec.in_chans, spec.input_size, spec.input_size)))
        runs = []
        for proc in (1, 2):
            out = folder / f"process{proc}.json"
            subprocess.run([sys.executable, __file__, "--child", str(folder), str(out), str(proc)], check=True,
                           cwd=REPO)
            runs.append(json.loads(out.read_text()))
    keys = [s.key for s in specs]
    first, second = [runs[0][k] for k in keys], [runs[1][k] for k in keys]
    d = rel_diffs(first, second)
    print(f"(a) {n} architectures, each timed alone in two separate processes (ONNX Runtime, per-trial protocol): "
          f"worst {max(d):.1%}, median {statistics.median(d):.1%} relative difference (target worst <= 5 %); "
          f"latencies {min(first):.4f}-{max(first):.4f} ms", flush=True)
    eager = LatencyMeter("torch").retime({s.key: s for s in specs})
    ort_together = meter.retime({s.key: s for s in specs})
    rho = spearman([eager[k].median_ms for k in keys], [ort_together[k].median_ms for k in keys])
    ratios = [eager[k].median_ms / ort_together[k].median_ms for k in keys]
    print(f"(d) eager PyTorch vs ONNX Runtime on the same {n} architectures (each interleaved): Spearman {rho:.2f}; "
          f"eager/ORT {min(ratios):.1f}-{max(ratios):.1f}x (information)", flush=True)


def part_b_and_c(budget: int) -> None:
    from autokd.latency.meter import LatencyMeter

    root = fresh_root("validity")
    try:
        summary, wall = run_search(root, quiet=True, budget=budget, mlflow=False)
        recorded, specs, records = recorded_latencies(root)
        measured = [r for r in records.values() if not r.get("cache_hit")]
        export_s = sum(r.get("export_s", 0.0) for r in measured)
        timing_s = sum(r.get("timing_s", 0.0) for r in measured)
        again = LatencyMeter("onnxruntime").retime(specs, seed=7)
        keys = sorted(specs)
        a, b = [recorded[k] for k in keys], [again[k].median_ms for k in keys]
        d = rel_diffs(a, b)
        print(f"(b) default search, {budget} trials, {len(keys)} architectures: recorded vs an independent interleaved "
              f"re-timing: Spearman {spearman(a, b):.3f} (target >= 0.98); worst {max(d):.1%}, median "
              f"{statistics.median(d):.1%}", flush=True)
        trial_s = sum(o.seconds for o in summary.outcomes)
        latency_s = sum(o.timings.get("latency_s", 0.0) for o in summary.outcomes)
        print(f"(c) latency bookkeeping: {latency_s:.1f} s of {trial_s:.1f} s trial time = {latency_s / trial_s:.1%} "
              f"(target <= 5 %); of it ONNX export {export_s:.1f} s, ORT sessions + timing {timing_s:.1f} s, the rest "
              f"MACs/params/cache; search wall {wall:.0f} s", flush=True)
    finally:
        cleanup(root)


def recorded_latencies(root: Path) -> tuple[dict[str, float], dict[str, object], dict[str, dict]]:
    """arch_key -> the latency the search recorded for it (the trial's final ``latency`` figure, the one its
    decisions and its told value used), arch_key -> its student spec, arch_key -> the whole record."""
    from autokd.model.students import resolve_student
    from autokd.study.record import sampled_params

    study = load_study(root)
    recorded: dict[str, float] = {}
    specs: dict[str, object] = {}
    records: dict[str, dict] = {}
    for t in study.trials:
        lat = t.user_attrs.get("latency")
        if not lat or "arch_key" not in t.user_attrs:
            continue
        flat = sampled_params(t.user_attrs)
        spec = resolve_student(flat["family"], float(flat["width"]), float(flat["depth"]), num_classes=10,
                               in_chans=1, input_size=16)
        if spec.key == t.user_attrs["arch_key"]:
            recorded.setdefault(spec.key, lat["median_ms"])
            records.setdefault(spec.key, lat)
            specs[spec.key] = spec
    return recorded, specs, records


def _share(summary: object) -> tuple[float, float]:
    trial_s = sum(o.seconds for o in summary.outcomes)  # type: ignore[attr-defined]
    latency_s = sum(o.timings.get("latency_s", 0.0) for o in summary.outcomes)  # type: ignore[attr-defined]
    return latency_s, trial_s


def _compare(a: dict[str, float], b: dict[str, float]) -> tuple[float, float, float, int]:
    keys = sorted(set(a) & set(b))
    d = rel_diffs([a[k] for k in keys], [b[k] for k in keys])
    return max(d), statistics.median(d), spearman([a[k] for k in keys], [b[k] for k in keys]), len(keys)


def part_e_and_f(budget: int) -> None:
    """(e) two identical searches, (f) the same with a process keeping one core busy during the second, and the
    host's floor: an independent interleaved re-timing of the same students, done twice back to back."""
    from autokd.latency import protocol
    from autokd.latency.meter import LatencyMeter

    overrides = {"budget": budget, "sampler": "random", "prune": False, "seed": 0, "mlflow": False}
    searches: list[dict[str, float]] = []
    records: list[dict[str, dict]] = []
    specs: dict[str, object] = {}
    shares = []
    for label in ("quiet 1", "quiet 2", "one core busy"):
        protocol.GATE.reset()  # each search starts as in a new process: what it learnt of the host is not shared
        busy = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if label == "one core busy" else None)
        root = fresh_root("insearch")
        try:
            summary, wall = run_search(root, quiet=True, **overrides)
            recorded, found, record = recorded_latencies(root)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
            cleanup(root)
        searches.append(recorded)
        records.append(record)
        specs.update(found)
        latency_s, trial_s = _share(summary)
        shares.append(latency_s / trial_s)
        print(f"    search {label}: {len(recorded)} architectures, wall {wall:.0f} s, latency bookkeeping "
              f"{latency_s:.1f} s of {trial_s:.1f} s trial time = {latency_s / trial_s:.1%}", flush=True)
    meter = LatencyMeter("onnxruntime")
    protocol.GATE.reset()
    retimed = [{k: r.median_ms for k, r in meter.retime(specs, seed=seed).items()} for seed in (7, 8)]
    fw, fm, frho, n = _compare(retimed[0], retimed[1])
    floor = f"host floor (the re-timing twice, back to back): worst {fw:.1%}, median {fm:.1%}, Spearman {frho:.3f}"
    ew, em, _, n = _compare(searches[0], searches[1])
    rho = min(_compare(search, retimed[0])[2] for search in searches[:2])
    print(f"(e) two identical searches ({budget} trials, random sampler, no pruning, seed 0), {n} architectures: "
          f"recorded latencies worst {ew:.1%}, median {em:.1%} apart (targets <= 10 %, <= 3 %); Spearman against "
          f"an independent interleaved re-timing {rho:.3f} (the lower of the two; target >= 0.98); {floor}",
          flush=True)
    bw, bm, _, n = _compare(searches[0], searches[2])
    print(f"(f) the same search with a second process keeping one core busy, against the first quiet one: worst "
          f"{bw:.1%}, median {bm:.1%} (target worst <= 15 %); Spearman against the re-timing "
          f"{_compare(searches[2], retimed[0])[2]:.3f}", flush=True)
    print(f"    latency bookkeeping in these searches: {', '.join(f'{x:.1%}' for x in shares)} of trial time",
          flush=True)
    # Information: how fast the host's fast phase was in each search (the gate's reference figure), and the
    # comparison again with each figure rescaled by it (not what autokd records: models slow down by different
    # factors than the reference).
    refs = [{k: r[k].get("reference_ms", 0.0) for k in r} for r in records]
    if all(v > 0 for ref in refs for v in ref.values()):
        common = statistics.median(v for ref in refs for v in ref.values())
        scaled = [{k: s[k] * common / ref[k] for k in s} for s, ref in zip(searches, refs)]
        sw, sm, _, _ = _compare(scaled[0], scaled[1])
        srho = min(_compare(x, retimed[0])[2] for x in scaled[:2])
        bw2, bm2, _, _ = _compare(scaled[0], scaled[2])
        print(f"    reference fast-phase figure per search (median over its architectures, ms): "
              f"{', '.join(f'{statistics.median(ref.values()):.4f}' for ref in refs)}; rescaled by it: (e) worst "
              f"{sw:.1%}, median {sm:.1%}, Spearman {srho:.3f}; (f) worst {bw2:.1%}, median {bm2:.1%} (information)",
              flush=True)
    # Information: the anchored figures (autokd.latency.anchors) again, with the first search's panel figures in
    # every search (what searches sharing one latency cache get), and the students' own unscaled figures.
    anchored = [{k: r[k] for k in r if r[k].get("anchor")} for r in records]
    if all(anchored):
        panel = {r["anchor"]: r["anchor_panel_ms"] for r in anchored[0].values()}
        shared = [{k: r["own_ms"] / r["anchor_ms"] * panel[r["anchor"]] for k, r in a.items() if r["anchor"] in panel}
                  for a in anchored]
        own = [{k: r["own_ms"] for k, r in a.items()} for a in anchored]
        sw, sm, _, _ = _compare(shared[0], shared[1])
        bw2, bm2, _, _ = _compare(shared[0], shared[2])
        ow, om, orho, _ = _compare(own[0], own[1])
        drift = max(abs(r["anchor_panel_ms"] / panel[r["anchor"]] - 1) for a in anchored[1:] for r in a.values()
                    if r["anchor"] in panel)
        print(f"    anchors: panel figures moved by up to {drift:.1%} from the first search to the others; with the "
              f"first search's panel in all: (e) worst {sw:.1%}, median {sm:.1%}; (f) worst {bw2:.1%}, median "
              f"{bm2:.1%}; the students' own figures (not scaled): (e) worst {ow:.1%}, median {om:.1%} "
              "(information)", flush=True)
    keys = sorted(set(searches[0]) & set(searches[1]) & set(searches[2]),
                  key=lambda k: -abs(searches[0][k] - searches[1][k]) / min(searches[0][k], searches[1][k]))
    print("    per architecture (most apart in (e) first): recorded ms in quiet 1 / quiet 2 / busy (* provisional), "
          "re-timed ms", flush=True)
    for k in keys:
        cells = " / ".join(f"{s[k]:.4f}{'' if r[k].get('settled', True) else '*'}" for s, r in zip(searches, records))
        print(f"      {k:24s} {cells}   re-timed {retimed[0][k]:.4f} / {retimed[1][k]:.4f}", flush=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 architectures and a 12-trial search")
    parser.add_argument("--archs", type=int, help="architectures for (a) and (d) (default 30; --quick 20)")
    parser.add_argument("--budget", type=int, help="trials of the default search for (b) and (c) (default 50)")
    parser.add_argument("--only", choices=("ad", "bc", "ef"), help="run only these parts")
    parser.add_argument("--insearch-budget", type=int, default=16, help="trials of each search of (e) and (f)")
    args = parser.parse_args()
    archs = args.archs or (20 if args.quick else 30)
    budget = args.budget or (12 if args.quick else 50)
    started = time.perf_counter()
    if args.only in (None, "ad"):
        part_a_and_d(archs)
    if args.only in (None, "bc"):
        part_b_and_c(budget)
    if args.only in (None, "ef"):
        part_e_and_f(args.insearch_budget)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

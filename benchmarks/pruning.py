"""Benchmark 4: pruning on versus off at the same budget (default space, shared cached teacher).

Prints epochs trained (target: pruned <= 60% of unpruned) and the front's hypervolume (target: pruned >= 95%
of unpruned), with one reference point for both: accuracy 0 and 1.1 x the slowest front member of either.

Like for like: by default both arms use the random sampler with the same seed, which draws the same
parameters for trial n whatever earlier trials scored, and share one latency cache (an architecture is timed
once). Training is seeded per trial, so the arms run the same trials and differ only in what pruning stops.
With `--sampler tpe` the sampler also adapts to the pruned results, so the arms explore different trials and
the ratio mixes pruning's effect with the sampler's path (at budget 30 that path dominated: see docs/performance.md).

    python benchmarks/pruning.py [--budget 50] [--sampler random|tpe] [--seed 0]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cleanup, fresh_root, load_study, run_search, study_stats  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--sampler", default="random", choices=("random", "tpe", "nsga2"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from autokd.select.pareto import hypervolume

    latency_cache = Path(tempfile.mkdtemp(prefix="autokd-bench-latency-"))
    stats = {}
    for arm, prune in (("pruned", True), ("unpruned", False)):
        root = fresh_root(arm, latency_cache=latency_cache)
        _, wall = run_search(root, budget=args.budget, prune=prune, mlflow=False, sampler=args.sampler,
                             seed=args.seed)
        stats[arm] = study_stats(load_study(root)) | {"wall": wall}
        cleanup(root)
    shutil.rmtree(latency_cache, ignore_errors=True)
    ref = (0.0, 1.1 * max(lat for s in stats.values() for _, lat in s["front"]))
    hv = {arm: hypervolume(s["front"], ref) for arm, s in stats.items()}
    print(f"sampler {args.sampler}, seed {args.seed}, budget {args.budget}")
    for arm, s in stats.items():
        print(f"{arm:>8}: wall {s['wall']:.0f} s, epochs {s['trained']}, front {len(s['front'])}, "
              f"hypervolume {hv[arm]:.4f}, trials {s['counts']}")
    print(f"epochs pruned/unpruned: {stats['pruned']['trained'] / stats['unpruned']['trained']:.1%} (target <= 60%)")
    print(f"hypervolume pruned/unpruned: {hv['pruned'] / hv['unpruned']:.1%} (target >= 95%; reference point "
          f"accuracy 0, latency {ref[1]:.3f} ms)")
    print(f"wall pruned/unpruned: {stats['pruned']['wall'] / stats['unpruned']['wall']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

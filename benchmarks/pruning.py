"""Benchmark 4: pruning on versus off at the same budget (default space, shared cached teacher).

Prints epochs trained (target: pruned <= 60% of unpruned) and the front's hypervolume (target: pruned >= 95%
of unpruned), with one reference point for both: accuracy 0 and 1.1 x the slowest completed trial of either.

    python benchmarks/pruning.py [--budget 50]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cleanup, fresh_root, load_study, run_search, study_stats  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=int, default=50)
    args = parser.parse_args()
    from autokd.pareto import hypervolume

    stats = {}
    for arm, prune in (("pruned", True), ("unpruned", False)):
        root = fresh_root(arm)
        _, wall = run_search(root, budget=args.budget, prune=prune, mlflow=False)
        stats[arm] = study_stats(load_study(root)) | {"wall": wall}
        cleanup(root)
    ref = (0.0, 1.1 * max(lat for s in stats.values() for _, lat in s["front"]))
    hv = {arm: hypervolume(s["front"], ref) for arm, s in stats.items()}
    for arm, s in stats.items():
        print(f"{arm:>8}: wall {s['wall']:.0f} s, epochs {s['trained']}, front {len(s['front'])}, "
              f"hypervolume {hv[arm]:.4f}, trials {s['counts']}")
    print(f"epochs pruned/unpruned: {stats['pruned']['trained'] / stats['unpruned']['trained']:.1%} (target <= 60%)")
    print(f"hypervolume pruned/unpruned: {hv['pruned'] / hv['unpruned']:.1%} (target >= 95%; reference point "
          f"accuracy 0, latency {ref[1]:.3f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

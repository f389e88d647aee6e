"""Benchmark: the real default search (`autokd search --budget 50` settings) from scratch, teacher included.

Prints, from one run:
- wall time, trials complete/pruned/failed, epochs trained versus the unpruned maximum, front size
  (targets on a 2-core CPU: < 5 min, >= 40% of epochs saved, no failed trial, front >= 4);
- bookkeeping overhead (sampling + storage + MLflow + latency measurement + checkpointing) as a share of
  trial time (target <= 5%);
- resident memory after each trial: peak, and trial-50 minus trial-5 (targets < 3 GB, flat).

    python benchmarks/search_default.py [--budget 50] [--jobs N]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_study, peak_rss_mb, rss_mb, run_search, study_stats  # noqa: E402

BOOKKEEPING = ("claim_s", "sample_s", "latency_s", "tracking_s", "epoch_bookkeeping_s", "save_s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--keep", action="store_true", help="keep the outputs root")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="autokd-bench-default-"))  # from scratch: no shared teacher here
    rss_after_trial: list[float] = []
    summary, wall = run_search(root, after_trial=lambda: rss_after_trial.append(rss_mb()), budget=args.budget)
    stats = study_stats(load_study(root))
    counts = stats["counts"]
    saved = 1 - stats["trained"] / stats["unpruned"] if stats["unpruned"] else 0.0
    trial_time = sum(o.seconds + o.timings.get("claim_s", 0.0) for o in summary.outcomes)
    overhead = sum(o.timings.get(k, 0.0) for o in summary.outcomes for k in BOOKKEEPING)
    by_kind = {k: sum(o.timings.get(k, 0.0) for o in summary.outcomes) for k in BOOKKEEPING}

    print("\n== default search ==")
    print(f"wall time: {wall:.1f} s ({wall / 60:.2f} min; target < 5 min)")
    print("trials: " + ", ".join(f"{k.lower()} {v}" for k, v in counts.items()))
    print(f"epochs trained: {stats['trained']} of {stats['unpruned']} unpruned ({saved:.1%} saved; target >= 40%)")
    print(f"front size: {len(stats['front'])} (target >= 4)")
    print(f"bookkeeping: {overhead:.1f} s of {trial_time:.1f} s trial time = {overhead / trial_time:.1%} "
          f"(target <= 5%): " + ", ".join(f"{k} {v:.1f}s" for k, v in by_kind.items()))
    if rss_after_trial:
        fifth = rss_after_trial[min(4, len(rss_after_trial) - 1)]
        print(f"memory: peak RSS {peak_rss_mb():.0f} MB (target < 3000); RSS after trial 5 {fifth:.0f} MB, after "
              f"trial {len(rss_after_trial)} {rss_after_trial[-1]:.0f} MB (growth {rss_after_trial[-1] - fifth:+.0f} MB)")
        print("RSS after each trial (MB): " + " ".join(f"{v:.0f}" for v in rss_after_trial))
    ok = (wall < 300 and saved >= 0.40 and counts["FAIL"] == 0 and len(stats["front"]) >= 4
          and overhead / trial_time <= 0.05)
    print("targets met" if ok else "some targets NOT met (see above)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"outputs kept in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

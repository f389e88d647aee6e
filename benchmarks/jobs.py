"""Benchmark 3: `--jobs 2` versus `--jobs 1` on the default search, same budget, shared cached teacher.

Prints the wall-time ratio and checks that each arm finished exactly the budget in trials.

    python benchmarks/jobs.py [--budget 20]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, cleanup, fresh_root, load_study, study_stats  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=int, default=20)
    args = parser.parse_args()
    walls, finished = {}, {}
    for jobs in (1, 2):
        root = fresh_root(f"jobs{jobs}")
        cmd = [sys.executable, "-m", "autokd.cli", "--root", str(root), "search", "--budget", str(args.budget),
               "--jobs", str(jobs), "--no-mlflow"]
        started = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ), stdout=subprocess.DEVNULL)
        walls[jobs] = time.perf_counter() - started
        stats = study_stats(load_study(root))
        finished[jobs] = stats["finished"]
        cleanup(root)
        # The arms sample different trials (each worker has its own sampler), so also print the work done.
        print(f"--jobs {jobs}: {walls[jobs]:.1f} s, {finished[jobs]} finished trials {stats['counts']}, "
              f"{stats['trained']} epochs trained ({walls[jobs] / max(stats['trained'], 1):.3f} s per epoch)",
              flush=True)
    print(f"wall time --jobs 2 / --jobs 1: {walls[2] / walls[1]:.2f} "
          f"(speed-up {walls[1] / walls[2]:.2f}x); exactly the budget: "
          f"{finished[1] == args.budget and finished[2] == args.budget}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

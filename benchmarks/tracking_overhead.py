"""Benchmark: what MLflow tracking costs a search — the same search with the local MLflow store and with --no-mlflow.

Both arms run the default space (`search_spaces/default.yaml`) with the same budget, seed and sampler, with
pruning off so that both train exactly the same epochs, from the same teacher (cached by a warm-up run that is
not timed). Prints, from one run:
- wall time of each arm and their ratio (the MLflow arm includes opening the store: a fresh SQLite database);
- the tracking share of trial time in the MLflow arm, from the per-trial timings (`tracking_s` is every MLflow
  call of a trial: run creation, params, per-epoch metrics, artifacts, final status) — target < 5%;
- the per-trial timing buckets of both arms, and whether both arms sampled the same trials.

The arms run twice, in the order A B B A (--rounds 2, the default), which cancels a linear drift of a shared
machine's speed: a single A B pair once showed a 1.29 wall ratio that was all training-speed drift.

    python benchmarks/tracking_overhead.py [--budget 10] [--seed 0] [--rounds 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cleanup, fresh_root, load_study, run_search  # noqa: E402

BUCKETS = ("claim_s", "sample_s", "latency_s", "tracking_s", "epoch_bookkeeping_s", "train_s", "save_s")


def _arm(name: str, budget: int, seed: int, mlflow: bool) -> dict[str, Any]:
    root = fresh_root(name)
    try:
        summary, wall = run_search(root, quiet=True, budget=budget, seed=seed, prune=False, mlflow=mlflow)
        study = load_study(root)
        params = [t.params for t in sorted(study.trials, key=lambda t: t.number)]
        epochs = sum(len(t.user_attrs.get("curve", [])) for t in study.trials)
        runs = 0
        if mlflow:
            from mlflow.tracking import MlflowClient

            from autokd.tracking import default_tracking_uri

            client = MlflowClient(tracking_uri=default_tracking_uri(root))
            experiment = client.get_experiment_by_name(study.study_name)
            runs = len(client.search_runs([experiment.experiment_id], max_results=1000))
    finally:
        cleanup(root)
    outcomes = summary.outcomes
    return {
        "wall": wall,
        "loop": summary.seconds,
        "trial_time": sum(o.seconds + o.timings.get("claim_s", 0.0) for o in outcomes),
        "buckets": {k: sum(o.timings.get(k, 0.0) for o in outcomes) for k in BUCKETS},
        "states": [o.state for o in outcomes],
        "params": params,
        "epochs": epochs,
        "runs": runs,
    }


def _add(total: dict[str, Any], arm: dict[str, Any]) -> None:
    if not total:
        total.update(arm)
        return
    for key in ("wall", "loop", "trial_time", "epochs", "runs"):
        total[key] += arm[key]
    total["buckets"] = {k: total["buckets"][k] + arm["buckets"][k] for k in BUCKETS}
    total["states"] = total["states"] + arm["states"]
    total["same_params"] = total.get("same_params", True) and total["params"] == arm["params"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of both arms, alternating their order (default 2: A B B A)")
    args = parser.parse_args()

    print("warm-up (not timed): train/cache the teacher, first-call costs of torch ...", flush=True)
    warm = fresh_root("warm")
    run_search(warm, quiet=True, budget=1, seed=args.seed, prune=False, mlflow=False)
    cleanup(warm)
    import mlflow.tracking  # noqa: F401 - an import cost once per process, not a per-search cost

    arms: dict[str, dict[str, Any]] = {}
    order = [("mlflow", True), ("no-mlflow", False)]
    for round_ in range(args.rounds):
        for name, mlflow in order if round_ % 2 == 0 else order[::-1]:
            print(f"round {round_ + 1}: arm {name} ...", flush=True)
            _add(arms.setdefault(name, {}), _arm(name, args.budget, args.seed, mlflow))

    on, off = arms["mlflow"], arms["no-mlflow"]
    print(f"\n== tracking overhead: default space, budget {args.budget}, seed {args.seed}, --no-prune, "
          f"{args.rounds} round(s), totals ==")
    for name, arm in arms.items():
        print(f"{name:>10}: wall {arm['wall']:6.1f} s, trial loop {arm['loop']:6.1f} s, trial time "
              f"{arm['trial_time']:6.1f} s, epochs {arm['epochs']}, states {sorted(set(arm['states']))}"
              + (f", MLflow runs {arm['runs']}" if name == "mlflow" else ""))
        print(" " * 12 + ", ".join(f"{k} {v:.2f}" for k, v in arm["buckets"].items()))
    same = (on["params"] == off["params"] and on["epochs"] == off["epochs"] and on.get("same_params", True)
            and off.get("same_params", True))
    print(f"same trials in both arms: {'yes' if same else 'NO (the comparison is not like for like)'}")
    share = on["buckets"]["tracking_s"] / on["trial_time"]
    per_trial = on["buckets"]["tracking_s"] / max(1, len(on["states"]))
    per_epoch = on["buckets"]["tracking_s"] / max(1, on["epochs"])
    print(f"wall-time ratio mlflow/no-mlflow: {on['wall'] / off['wall']:.3f} (trial loop only: "
          f"{on['loop'] / off['loop']:.3f}; machine noise included: it is shared)")
    print(f"tracking: {on['buckets']['tracking_s']:.2f} s of {on['trial_time']:.1f} s trial time = {share:.2%} "
          f"(target < 5%); {per_trial * 1000:.0f} ms per trial ({per_epoch * 1000:.0f} ms per trained epoch)")
    print("target met" if share < 0.05 else "TARGET NOT MET")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared helpers of the benchmark scripts: fresh output roots, a shared teacher cache, study statistics."""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

REPO = Path(__file__).resolve().parent.parent
WARM_TEACHERS = Path(tempfile.gettempdir()) / "autokd-bench-teachers"


def fresh_root(prefix: str, latency_cache: Path | None = None) -> Path:
    """A new empty outputs root whose teacher cache is shared with the other benchmark runs.

    The teacher is trained once (the first run pays for it); every arm of a comparison then starts from the
    same cached teacher, so the ratios compare the search, not teacher training. With `latency_cache`, the
    arms also share one latency cache: an architecture is timed once and both arms see the same latency.
    """
    root = Path(tempfile.mkdtemp(prefix=f"autokd-bench-{prefix}-"))
    WARM_TEACHERS.mkdir(parents=True, exist_ok=True)
    os.symlink(WARM_TEACHERS, root / "teachers")
    if latency_cache is not None:
        latency_cache.mkdir(parents=True, exist_ok=True)
        os.symlink(latency_cache, root / "latency_cache")
    return root


def printed_messages() -> contextlib.AbstractContextManager[None]:
    """While the block runs, print the library's messages (the ``autokd`` loggers, INFO and up) bare, as the
    `autokd` command does (its own handler)."""
    from autokd.cli import console_logging

    return console_logging()


def run_search(root: Path, quiet: bool = False, after_trial: Callable[[], None] | None = None,
               **overrides: Any) -> tuple[Any, float]:
    """Run `autokd search` in-process with the CLI defaults plus `overrides`; returns (summary, wall seconds).

    Prints the search's messages and, after each trial, the CLI's progress line, unless `quiet` (then only the
    library's warnings show, on stderr); `after_trial()` is called after each trial."""
    from autokd.cli import progress_line
    from autokd.config import SearchSettings
    from autokd.search.run import run_search as _run

    settings = SearchSettings(space=REPO / "search_spaces" / "default.yaml", root=root, **overrides)

    def on_trial(outcome: Any, progress: Any) -> None:
        if not quiet:
            print(progress_line(outcome, progress), flush=True)
        if after_trial is not None:
            after_trial()

    started = time.perf_counter()
    with contextlib.nullcontext() if quiet else printed_messages():
        summary = _run(settings, on_trial=on_trial)
    return summary, time.perf_counter() - started


def load_study(root: Path) -> optuna.Study:
    """The only study under `root`."""
    from autokd.study.store import make_storage

    storage = make_storage(None, root)
    [summary] = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def study_stats(study: optuna.Study) -> dict[str, Any]:
    """Counts by state, epochs trained versus the unpruned maximum, front size and front points."""
    from autokd.report.build import trial_points

    points = trial_points(study)
    counts = {s: sum(p.state == s for p in points) for s in ("COMPLETE", "PRUNED", "FAIL", "INFEASIBLE")}
    max_epochs = study.user_attrs["space"]["epochs"]
    trained = sum(len(t.user_attrs.get("curve", [])) for t in study.trials)
    unpruned = max_epochs * sum(1 for p in points if p.state in ("COMPLETE", "PRUNED", "FAIL"))
    front = [(t.values[0], t.values[1]) for t in study.best_trials]
    return {"counts": counts, "trained": trained, "unpruned": unpruned, "front": front,
            "finished": sum(counts.values())}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident memory of this process (MB)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cleanup(root: Path) -> None:
    """Remove a benchmark root (the shared teacher cache stays)."""
    shutil.rmtree(root, ignore_errors=True)

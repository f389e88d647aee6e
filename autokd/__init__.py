"""autokd: joint search over timm student architectures and knowledge-distillation hyperparameters.

The few entry points a notebook needs, each the library call behind one command::

    import autokd
    summary = autokd.run_search(autokd.SearchSettings(budget=20))     # autokd search --budget 20
    report = autokd.build_report(summary.study_name)                   # autokd report
    result = autokd.export_trial(summary.study_name, pick="knee", out="student/")   # autokd export
    model = autokd.load_student("student/")

Heavy modules (torch, timm, MLflow) are imported when an entry point is called, not by ``import autokd``.

The library reports progress through :mod:`logging`, under ``logging.getLogger("autokd")`` (one child logger per
module), and adds no handler of its own: the ``autokd`` command prints the messages, a notebook shows its INFO
progress only once logging is configured, and its warnings (like any library's) on stderr until then::

    import logging
    logging.basicConfig(format="%(message)s")
    logging.getLogger("autokd").setLevel(logging.INFO)      # show progress; logging.ERROR silences warnings too
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from autokd._version import __version__
from autokd.config import SearchSettings, studies_root

if TYPE_CHECKING:
    from torch import nn

    from autokd.export.int8 import OrtStudent
    from autokd.export.student import ExportResult
    from autokd.report.render import ReportResult
    from autokd.search.run import SearchSummary

__all__ = ["SearchSettings", "__version__", "build_report", "export_trial", "load_student", "run_search"]


def run_search(settings: SearchSettings | None = None, **fields: Any) -> SearchSummary:
    """Run (or resume, or top up) a study as ``autokd search`` does and return its summary.

    ``fields`` override the settings by name (``run_search(budget=20, dataset="digits")``); bad values raise
    :class:`autokd.errors.UserError` with the message the CLI would print.
    """
    import dataclasses

    from autokd.search.run import run_search as _run_search

    settings = dataclasses.replace(settings or SearchSettings(), **fields)
    return _run_search(settings)


def build_report(study: str | None = None, *, root: str | Path | None = None, storage: str | None = None,
                 max_latency_ms: float | None = None, tolerance_pp: float = 1.0) -> ReportResult | None:
    """Write ``studies/<study>/report/`` as ``autokd report`` does (None when no trial has completed yet).

    ``study`` is a study name; None picks the only (or the most recent) study in the storage.
    """
    from autokd.report.build import report_command

    return report_command(study, storage, Path(root) if root is not None else studies_root(), max_latency_ms,
                          tolerance_pp, None, None)


def export_trial(study: str | None = None, *, out: str | Path, trial: int | None = None, pick: str | None = None,
                 max_latency_ms: float | None = None, formats: str | None = None, int8: bool = False,
                 root: str | Path | None = None, storage: str | None = None, force: bool = False) -> ExportResult:
    """Export one trial's student to ``out`` as ``autokd export`` does (``trial=N``, ``pick="knee"|"best"|
    "fastest"`` or ``max_latency_ms``); every written file is checked for parity before it is published.
    ``out`` must be new or empty unless ``force`` (then only the export's own files in it are replaced)."""
    from autokd.export.int8 import int8_options
    from autokd.export.student import export_command

    return export_command(study, storage, Path(root) if root is not None else studies_root(), trial, pick,
                          max_latency_ms, Path(out), formats, None, int8_options(int8), force=force)


def load_student(path: str | Path, int8: bool = False) -> nn.Module | OrtStudent:
    """Load an exported student directory (model.safetensors + config.json) as a ready nn.Module.

    ``int8=True``: its ``model.int8.onnx`` (``autokd export --int8``) instead, as an ONNX Runtime session wrapper
    called the same way (``model(x)`` -> logits; torch in, torch out; numpy in, numpy out).
    """
    if int8:
        from autokd.export.int8 import load_int8_student

        return load_int8_student(path)
    from autokd.export.student import load_student as _load_student

    return _load_student(path)

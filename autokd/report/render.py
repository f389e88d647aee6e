"""Study report: an offline interactive HTML page, a static PNG, the front as CSV, a Markdown summary.

Every output states the hypervolume together with its reference point: the default reference is
(accuracy 0.0, latency 1.1 x the largest latency among COMPLETE trials), which depends on the study, so
hypervolumes of different studies are only comparable when the caller passes the same ``hv_ref``.
Files are written atomically (temporary file in the same directory, then ``os.replace``) so a report being
regenerated is never seen half-written.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from autokd.select.pareto import (
    RECOMMENDATION_KEYS,
    TIE_RULE,
    TrialPoint,
    check_hv_ref,
    front_points,
    hypervolume,
    is_finite,
    recommend,
    ties,
)
from autokd.study.record import State
from autokd.utils.atomic import atomic_write_bytes

__all__ = ["ReportResult", "default_hv_ref", "format_front_table", "write_report"]

# The states trial_state gives, in the order the report lists and draws them (others, if any, follow by name).
STATES = tuple(s.value for s in (State.COMPLETE, State.PRUNED, State.FAIL, State.INFEASIBLE, State.RUNNING))

STATE_COLORS = {
    "COMPLETE": "#1f77b4",
    "PRUNED": "#ff7f0e",
    "FAIL": "#d62728",
    "INFEASIBLE": "#7f7f7f",
    "RUNNING": "#9467bd",
}
FRONT_COLOR = "#2ca02c"
# plotly symbol, matplotlib marker, colour, size: distinct shapes and sizes so coinciding picks stay visible
PICK_STYLE = {
    "knee": ("star", "*", "#ffbf00", 22),
    "best_under_latency": ("diamond-open", "D", "#e377c2", 22),
    "fastest_within_tolerance": ("square-open", "s", "#17becf", 28),
}
# plotly marker symbol, matplotlib marker of each student family (shape = family, colour = state)
FAMILY_SYMBOLS = {
    "resnet": ("circle", "o"),
    "mobilenetv3": ("triangle-up", "^"),
    "efficientnet": ("diamond", "D"),
    "regnet": ("square", "s"),
    "convnext": ("pentagon", "p"),
    "vit": ("cross", "P"),
}
OTHER_FAMILY_SYMBOL = ("hexagon", "h")
PICK_LABEL = {
    "knee": "knee",
    "best_under_latency": "best under latency",
    "fastest_within_tolerance": "fastest within tolerance",
}
# report.html's recommendations table marks each pick as the plot does (PICK_STYLE's shape, in its colour).
PICK_GLYPH = {"knee": "\u2605", "best_under_latency": "\u25c7", "fastest_within_tolerance": "\u25a1"}


@dataclass
class ReportResult:
    """What :func:`write_report` computed and wrote."""

    front: list[TrialPoint]
    recommendations: dict[str, TrialPoint | None]
    hypervolume: float
    hv_ref: tuple[float, float]
    files: list[Path]
    counts: dict[str, int] = field(default_factory=dict)
    ties: dict[int, list[int]] = field(default_factory=dict)  # trial number -> front members tied with it


# ---------------------------------------------------------------- small helpers

def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def _params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt_value(v)}" for k, v in sorted(_flatten(params).items()))


def _pct(x: float | None) -> str:
    return f"{100 * x:.2f}" if is_finite(x) else "-"


def _ms(x: float | None) -> str:
    return f"{x:.3f}" if is_finite(x) else "-"


def _interval(fmt: Callable[[float | None], str]) -> Callable[[tuple[float, float] | None], str]:
    """The text of an interval, its ends formatted by ``fmt``; "-" when there is none."""
    return lambda ci: f"{fmt(ci[0])}-{fmt(ci[1])}" if ci else "-"


_acc_ci, _lat_ci = _interval(_pct), _interval(_ms)

# A --latency-precision int8 study's front: each member's test accuracy as its fp32 and INT8 ONNX models (ONNX
# Runtime, full test split; autokd.report.build.int8_accuracies).
INT8_ACC_FIELDS = ("fp32_test_acc", "int8_test_acc")


def _has_int8(points: Sequence[TrialPoint]) -> bool:
    """Some point has a finite INT8_ACC_FIELDS figure: only then are they shown as columns (and in the hover)."""
    return any(is_finite(p.fp32_test_acc) or is_finite(p.int8_test_acc) for p in points)


def _error_bars(pts: Sequence[TrialPoint]) -> dict[str, Any]:
    """Plotly error_x / error_y (asymmetric) from the points' intervals; empty where none is known."""
    if not any(p.latency_ci or p.acc_ci for p in pts):
        return {}
    return {
        "error_x": {"type": "data", "symmetric": False, "thickness": 1, "width": 2,
                    "array": [p.latency_ci[1] - p.latency_ms if p.latency_ci else 0 for p in pts],  # type: ignore
                    "arrayminus": [p.latency_ms - p.latency_ci[0] if p.latency_ci else 0 for p in pts]},  # type: ignore
        "error_y": {"type": "data", "symmetric": False, "thickness": 1, "width": 2,
                    "array": [p.acc_ci[1] - p.val_acc if p.acc_ci else 0 for p in pts],  # type: ignore
                    "arrayminus": [p.val_acc - p.acc_ci[0] if p.acc_ci else 0 for p in pts]},  # type: ignore
    }


def _tags(p: TrialPoint, recs: Mapping[str, TrialPoint | None]) -> list[str]:
    return [k for k in RECOMMENDATION_KEYS if (r := recs.get(k)) is not None and r.number == p.number]


def _plot_acc(p: TrialPoint) -> float | None:
    """Where a trial is drawn on the accuracy axis: its value, else its last known accuracy, else not at all."""
    if is_finite(p.val_acc):
        return float(p.val_acc)  # type: ignore[arg-type]
    last = p.last_val_acc
    return float(last) if is_finite(last) else None


def _counts(points: Sequence[TrialPoint]) -> dict[str, int]:
    c = Counter(p.state for p in points)
    out = {s: c.get(s, 0) for s in STATES}
    out.update({s: n for s, n in sorted(c.items()) if s not in out})
    return out


def _counts_text(counts: Mapping[str, int]) -> str:
    total = sum(counts.values())
    return f"{total} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items())


def default_hv_ref(points: Sequence[TrialPoint]) -> tuple[float, float]:
    """(0.0, 1.1 x max latency among COMPLETE trials with finite latency); (0.0, 0.0) if there are none."""
    lats = [float(p.latency_ms) for p in points if p.state == "COMPLETE" and is_finite(p.latency_ms)]  # type: ignore[arg-type]
    return (0.0, 1.1 * max(lats)) if lats else (0.0, 0.0)


def _hv_text(hv: float, ref: tuple[float, float], is_default: bool) -> str:
    how = ("default: accuracy 0 and 1.1 x the largest latency among COMPLETE trials"
           if is_default else "given by the caller")
    return (f"hypervolume {hv:.6g} (accuracy x ms) w.r.t. reference point (accuracy {ref[0]:.4g}, "
            f"latency {ref[1]:.4g} ms; {how}); compare hypervolumes across studies only at the same reference point")


def _pick_rule(key: str, max_latency_ms: float | None, tolerance_pp: float, best_acc: float | None) -> str:
    """How the pick ``key`` chooses, in the study's figures: one short line."""
    if key == "best_under_latency":
        return (f"most accurate with latency <= {max_latency_ms:g} ms" if max_latency_ms is not None
                else "no latency budget given")
    if key == "fastest_within_tolerance":
        return f"fastest within {tolerance_pp:g} pp of the best {_pct(best_acc)}%"
    return "largest distance to the line between the front's extremes"


def _pick_text(key: str, p: TrialPoint | None, max_latency_ms: float | None, tolerance_pp: float,
               best_acc: float | None) -> str:
    """summary.md's line for the pick ``key``: its rule, then its trial's figures and parameters."""
    if key == "best_under_latency":
        cond = f"latency <= {max_latency_ms:g} ms" if max_latency_ms is not None else "no latency budget given"
    elif key == "fastest_within_tolerance":
        cond = f"within {tolerance_pp:g} pp of the best {_pct(best_acc)}%"
    else:
        cond = "largest distance to the line between the front's extremes"
    if p is None:
        why = "not requested" if key == "best_under_latency" and max_latency_ms is None else "none available"
        return f"{PICK_LABEL[key]} ({cond}): {why}"
    return (f"{PICK_LABEL[key]} ({cond}): trial {p.number}: val acc {_pct(p.val_acc)}%, "
            f"test acc {_pct(p.test_acc)}%, latency {_ms(p.latency_ms)} ms; {_params_text(p.params)}")


# ---------------------------------------------------------------- the front table: one definition, four renderers

# Where a column can show: report.html's front table and its table of every trial, summary.md, the terminal.
# front.csv shows the columns that name a CSV header.
HTML, ALL_TRIALS, MARKDOWN, TERMINAL, CSV = "html", "all-trials", "markdown", "terminal", "csv"
TABLES = frozenset({HTML, ALL_TRIALS, MARKDOWN, TERMINAL})


@dataclass(frozen=True)
class Table:
    """What a row's cells read besides its point: the report's picks and the ties among the front."""

    recommendations: Mapping[str, TrialPoint | None]
    ties: Mapping[int, list[int]] = field(default_factory=dict)


class _Absent:
    """The value of a column a point has nothing for (a parameter only other students have): an empty cell."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()


def _empty(v: Any) -> bool:
    return v is None or v is ABSENT or (isinstance(v, float) and not math.isfinite(v))


@dataclass(frozen=True)
class Column:
    """One column of the front table: its header, how a point gives its value, how each renderer shows that value,
    and when the column appears."""

    header: str
    value: Callable[[TrialPoint, Table], Any]
    text: Callable[[Any], str] = str  # the cell's text (HTML, summary.md, terminal)
    # A renderer's own text where it differs from ``text``; for CSV the cell (one per header), else the raw value.
    texts: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    num: bool = False  # a number: right-aligned; the HTML table sorts on the value
    right: bool | None = None  # right-aligned in summary.md and the terminal (default: ``num``)
    sort_by_value: bool | None = None  # the HTML table sorts on the value, not the text (default: ``num``)
    shown: frozenset[str] = TABLES
    csv: tuple[str, ...] = ()  # front.csv header(s), several where the value is a pair; none: not in the CSV
    csv_at: int = 0  # front.csv keeps the column order it always had: columns sort on this, stably
    when: Callable[[Sequence[TrialPoint]], bool] | None = None  # given the table's points; None: always

    @property
    def aligned_right(self) -> bool:
        return self.num if self.right is None else self.right

    def cell(self, renderer: str, p: TrialPoint, table: Table) -> Any:
        """The cell of ``p`` as ``renderer`` shows it."""
        value = self.value(p, table)
        if renderer in self.texts:
            return self.texts[renderer](value)
        return value if renderer == CSV else self.text(value)

    def html_cell(self, p: TrialPoint, table: Table) -> str:
        """The ``<td>`` of ``p``: its text, and in ``data-v`` what the table sorts on."""
        value = self.value(p, table)
        text = self.text(value)
        key = value if (self.num if self.sort_by_value is None else self.sort_by_value) else text
        cls = ' class="num"' if self.num else ""
        return f'<td{cls} data-v="{html.escape("" if _empty(key) else str(key))}">{html.escape(text)}</td>'


@dataclass(frozen=True)
class PerKey:
    """A column for each key found among the table's points: ``column(key)`` makes it."""

    keys: Callable[[Sequence[TrialPoint]], list[str]]
    column: Callable[[str], Column]


def _joined(sep: str, empty: str = "") -> Callable[[Sequence[Any]], str]:
    return lambda items: sep.join(map(str, items)) or empty


def _pair(ci: tuple[float, float] | None) -> tuple[float | None, float | None]:
    return ci or (None, None)


def _param_keys(points: Sequence[TrialPoint]) -> list[str]:
    return sorted({k for p in points for k in _flatten(p.params)})


def _param_column(key: str) -> Column:
    return Column(key, lambda p, t: _flatten(p.params).get(key, ABSENT), lambda v: "" if v is ABSENT else _fmt_value(v),
                  sort_by_value=True, shown=frozenset({HTML, ALL_TRIALS}), csv=(f"param.{key}",), csv_at=9)


def _recorded_column(name: str) -> Column:
    """front.csv's column of a recorded field (named as when these fields were one untyped dict, ``extra``), where a
    front member has a value; the INT8 test accuracies only when they are not shown as columns of their own."""
    def when(points: Sequence[TrialPoint]) -> bool:
        if name in INT8_ACC_FIELDS and _has_int8(points):
            return False
        return any(isinstance(getattr(p, name), (str, int, float, bool)) for p in points)

    return Column(f"extra.{name}", lambda p, t: getattr(p, name), shown=frozenset(), csv=(f"extra.{name}",), csv_at=10,
                  when=when)


# What the study recorded beside the objectives: TrialPoint's keyword-only fields.
RECORDED = tuple(sorted(f.name for f in fields(TrialPoint) if f.kw_only))

COLUMNS: tuple[Column | PerKey, ...] = (
    Column("trial", lambda p, t: p.number, num=True, csv=("number",), csv_at=0),
    Column("state", lambda p, t: p.state, shown=frozenset({ALL_TRIALS})),
    Column("val acc %", lambda p, t: p.val_acc, _pct, num=True, csv=("val_acc",), csv_at=1),
    Column("95% CI", lambda p, t: p.acc_ci, _acc_ci, right=True, texts={CSV: _pair},
           csv=("val_acc_low", "val_acc_high"), csv_at=5),
    Column("test acc %", lambda p, t: p.test_acc, _pct, num=True, csv=("test_acc",), csv_at=2),
    Column("fp32 test %", lambda p, t: p.fp32_test_acc, _pct, num=True, csv=("fp32_test_acc",), csv_at=8,
           when=_has_int8),
    Column("int8 test %", lambda p, t: p.int8_test_acc, _pct, num=True, csv=("int8_test_acc",), csv_at=8,
           when=_has_int8),
    Column("latency ms", lambda p, t: p.latency_ms, _ms, num=True, csv=("latency_ms",), csv_at=3),
    Column("interval", lambda p, t: p.latency_ci, _lat_ci, right=True, texts={CSV: _pair},
           csv=("latency_low_ms", "latency_high_ms"), csv_at=6),
    Column("first ms", lambda p, t: p.latency_first_ms, _ms, num=True, shown=frozenset({HTML, ALL_TRIALS})),
    Column("tied with", lambda p, t: t.ties.get(p.number, []), _joined(","),
           texts={MARKDOWN: _joined(",", "-"), TERMINAL: _joined(",", "-"), CSV: _joined(";")},
           csv=("tied_with",), csv_at=7),
    Column("picks", lambda p, t: _tags(p, t.recommendations), lambda tags: ", ".join(PICK_LABEL[k] for k in tags),
           texts={MARKDOWN: _joined(", "), TERMINAL: _joined(",", "-"), CSV: _joined(";")},
           csv=("recommendations",), csv_at=4),
    Column("params", lambda p, t: p.params, _params_text, shown=frozenset({MARKDOWN, TERMINAL})),
    PerKey(_param_keys, _param_column),  # the HTML tables and the CSV: one column per parameter
    *(_recorded_column(name) for name in RECORDED),
)


def _columns(points: Sequence[TrialPoint], renderer: str) -> list[Column]:
    """The columns ``renderer`` shows for a table of ``points``, in its order."""
    out = []
    for entry in COLUMNS:
        for col in [entry.column(k) for k in entry.keys(points)] if isinstance(entry, PerKey) else [entry]:
            shown = bool(col.csv) if renderer == CSV else renderer in col.shown
            if shown and (col.when is None or col.when(points)):
                out.append(col)
    return sorted(out, key=lambda c: c.csv_at) if renderer == CSV else out


def format_front_table(front: Sequence[TrialPoint], recommendations: Mapping[str, TrialPoint | None],
                       tie_map: Mapping[int, list[int]] | None = None) -> str:
    """The front as plain aligned text for the terminal (latency ascending), one trial per line.

    ``tie_map``: the front's ties (:attr:`ReportResult.ties`); computed here when not given."""
    if not front:
        return "Pareto front is empty: no COMPLETE trial with finite accuracy and latency."
    table = Table(recommendations, ties(front) if tie_map is None else tie_map)
    cols = _columns(front, TERMINAL)
    header = [c.header for c in cols]
    rows = [[c.cell(TERMINAL, p, table) for c in cols] for p in front]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {i for i, c in enumerate(cols) if i > 0 and c.aligned_right}  # the first column, the trial, reads left

    def line(r: list[str]) -> str:
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _html_table(points: Sequence[TrialPoint], table: Table, renderer: str) -> str:
    cols = _columns(points, renderer)
    out = ['<table class="sortable"><thead><tr>', *(f"<th>{html.escape(c.header)}</th>" for c in cols),
           "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(c.html_cell(p, table) for c in cols) + "</tr>" for p in points]
    out.append("</tbody></table>")
    return "".join(out)


def _csv_cell(v: Any) -> Any:
    if _empty(v):
        return ""
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else v


def _csv(front: list[TrialPoint], table: Table) -> bytes:
    cols = _columns(front, CSV)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([h for c in cols for h in c.csv])
    for p in front:
        cells = [(c.cell(CSV, p, table), len(c.csv)) for c in cols]
        w.writerow([_csv_cell(x) for v, n in cells for x in (v if n > 1 else [v])])
    return buf.getvalue().encode()


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _markdown_table(front: list[TrialPoint], table: Table) -> list[str]:
    cols = _columns(front, MARKDOWN)
    lines = ["| " + " | ".join(c.header for c in cols) + " |",
             "|" + "".join("---:|" if c.aligned_right else "---|" for c in cols)]
    lines += ["| " + " | ".join(_md_cell(c.cell(MARKDOWN, p, table)) for c in cols) + " |" for p in front]
    return lines


# ---------------------------------------------------------------- figures

def _hover(p: TrialPoint, tags: list[str]) -> str:
    acc = f"val acc: {_pct(p.val_acc)}%"
    if not is_finite(p.val_acc) and _plot_acc(p) is not None:
        acc += f" (last seen {_pct(_plot_acc(p))}%)"
    lines = [f"<b>trial {p.number}</b> ({html.escape(p.state)})", acc,
             f"test acc: {_pct(p.test_acc)}%", f"latency: {_ms(p.latency_ms)} ms"]
    if _has_int8([p]):
        lines.append(f"test acc (ONNX Runtime): fp32 {_pct(p.fp32_test_acc)}%, int8 {_pct(p.int8_test_acc)}%")
    if p.acc_ci or p.latency_ci:
        lines.append(f"intervals: acc {_acc_ci(p.acc_ci)}%, latency {_lat_ci(p.latency_ci)} ms")
    if p.latency_first_ms is not None:
        lines.append(f"first measurement: {_ms(p.latency_first_ms)} ms")
    if tags:
        lines.append("pick: " + ", ".join(PICK_LABEL[t] for t in tags))
    lines += [html.escape(f"{k} = {_fmt_value(v)}") for k, v in sorted(_flatten(p.params).items())]
    return "<br>".join(lines)


def _family(p: TrialPoint) -> str:
    return str(p.params.get("family", "?"))


def _symbols(pts: Sequence[TrialPoint]) -> list[str]:
    return [FAMILY_SYMBOLS.get(_family(p), OTHER_FAMILY_SYMBOL)[0] for p in pts]


def zoom_ranges(points: Sequence[TrialPoint], front: Sequence[TrialPoint]) -> tuple[list[float], list[float]] | None:
    """Axes (latency, accuracy) that show the front and the students near it, or None without a front.

    Pruned students stopped at low accuracy stretch a full view's accuracy axis over 0-100 %, which squeezes
    the front into a few pixels; this view spans the front's accuracies plus a margin below (half its spread,
    at least 3 points; never below 0 or above 100 % by more than a marker's room) and its latencies plus a margin
    on both sides.
    """
    pts = [p for p in front if is_finite(p.val_acc) and is_finite(p.latency_ms)]
    if not pts:
        return None
    accs = [float(p.val_acc) for p in pts]  # type: ignore[arg-type]
    lats = [float(p.latency_ms) for p in pts]  # type: ignore[arg-type]
    a_lo, a_hi, l_lo, l_hi = min(accs), max(accs), min(lats), max(lats)
    da = max(0.03, 0.5 * (a_hi - a_lo))
    # Not past 0 or 100 %, but with room for a marker on either: a wide front would otherwise show negative accuracy.
    y = [max(a_lo - da, min(a_lo, 0.0) - 0.01), min(a_hi + 0.3 * da, max(a_hi, 1.0) + 0.01)]
    # Students near the front: those in its accuracy band, up to 3x its slowest member's latency.
    near = [float(p.latency_ms) for p in points if is_finite(p.latency_ms) and (acc := _plot_acc(p)) is not None  # type: ignore[arg-type]
            and y[0] <= acc <= y[1] and float(p.latency_ms) <= 3 * l_hi]  # type: ignore[arg-type]
    right = max([l_hi, *near])
    dl = max(0.1 * right, 0.05 * (right - l_lo))
    return [max(0.0, min([l_lo, *near]) - dl), right + dl], y


# The page's first plot: short enough that the recommendations below it show in a 1000-pixel-high window.
TOP_PLOT_HEIGHT = 540


def _plotly_figure(points: Sequence[TrialPoint], front: list[TrialPoint], recs: Mapping[str, TrialPoint | None],
                   title: str, max_latency_ms: float | None, zoom: bool = False, height: int = 620) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    front_numbers = {p.number for p in front}
    states = [s for s in STATES] + sorted({p.state for p in points} - set(STATES))
    for state in states:
        pts = [p for p in points if p.state == state and p.number not in front_numbers
               and is_finite(p.latency_ms) and _plot_acc(p) is not None]
        if not pts:
            continue
        label = state if state != "PRUNED" else "PRUNED (at last accuracy)"
        fig.add_trace(go.Scatter(
            x=[p.latency_ms for p in pts], y=[_plot_acc(p) for p in pts], mode="markers", name=label,
            marker={"color": STATE_COLORS.get(state, "#8c564b"), "size": 8, "symbol": _symbols(pts),
                    "opacity": 0.85 if state == "COMPLETE" else 0.55},
            text=[_hover(p, []) for p in pts], hovertemplate="%{text}<extra></extra>",
            legendgroup=state, showlegend=False,
        ))
        fig.add_trace(go.Scatter(  # its legend entry: the state's colour on a neutral shape
            x=[None], y=[None], mode="markers", name=label, legendgroup=state, hoverinfo="skip",
            marker={"color": STATE_COLORS.get(state, "#8c564b"), "size": 9, "symbol": "circle"},
        ))
    if front:
        fig.add_trace(go.Scatter(
            x=[p.latency_ms for p in front], y=[p.val_acc for p in front], mode="lines+markers",
            line={"shape": "hv", "color": FRONT_COLOR, "width": 2}, name="Pareto front (shape = family)",
            marker={"color": FRONT_COLOR, "size": 11, "symbol": _symbols(front),
                    "line": {"color": "black", "width": 1}}, **_error_bars(front),
            text=[_hover(p, _tags(p, recs)) for p in front], hovertemplate="%{text}<extra></extra>",
        ))
    for key in RECOMMENDATION_KEYS:
        p = recs.get(key)
        if p is None:
            continue
        symbol, _, color, size = PICK_STYLE[key]
        fig.add_trace(go.Scatter(
            x=[p.latency_ms], y=[p.val_acc], mode="markers", name=f"{PICK_LABEL[key]} (trial {p.number})",
            marker={"symbol": symbol, "color": color, "size": size, "line": {"color": color if "open" in symbol else "black", "width": 2}},
            text=[_hover(p, _tags(p, recs))], hovertemplate="%{text}<extra></extra>",
        ))
    for family in sorted({_family(p) for p in points}):  # legend entries for the shapes
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="markers", name=f"family: {family}", hoverinfo="skip",
            marker={"symbol": FAMILY_SYMBOLS.get(family, OTHER_FAMILY_SYMBOL)[0], "color": "#444", "size": 9},
        ))
    if max_latency_ms is not None:
        fig.add_vline(x=max_latency_ms, line={"dash": "dash", "color": "#555"},
                      annotation_text=f"latency budget {max_latency_ms:g} ms", annotation_position="top")
    ranges = zoom_ranges(points, front) if zoom else None
    if ranges is not None:
        title = f"{title}: the front and the students near it (zoomed; drag or double-click to change)"
        fig.update_xaxes(range=ranges[0])
        fig.update_yaxes(range=ranges[1])
    fig.update_layout(
        title={"text": html.escape(title)}, template="plotly_white", height=height,
        xaxis_title="latency (ms, batch 1) - lower is better", yaxis_title="validation accuracy - higher is better",
        yaxis_tickformat=".1%", legend={"orientation": "v"}, hovermode="closest", margin={"t": 60, "b": 60},
    )
    return fig


def outside_view(points: Sequence[TrialPoint], ranges: tuple[Sequence[float], Sequence[float]]) -> list[TrialPoint]:
    """The plotted points (finite latency, an accuracy to draw) that fall outside ``ranges`` (latency, accuracy)."""
    (x_lo, x_hi), (y_lo, y_hi) = ranges
    return [p for p in points if is_finite(p.latency_ms) and (acc := _plot_acc(p)) is not None
            and not (x_lo <= float(p.latency_ms) <= x_hi and y_lo <= acc <= y_hi)]  # type: ignore[arg-type]


def _outside_text(outside: Sequence[TrialPoint]) -> str:
    if not outside:
        return "zoomed on the front: every plotted trial is in view"
    listed = ", ".join(str(p.number) for p in sorted(outside, key=lambda p: p.number)[:12])
    more = ", ..." if len(outside) > 12 else ""
    return (f"zoomed on the front: {len(outside)} trial(s) outside this view ({listed}{more}); "
            "report.html's full view shows every trial")


def _family_groups(pts: Sequence[TrialPoint]) -> dict[str, list[TrialPoint]]:
    """``pts`` by matplotlib marker of their family (one scatter call draws one marker)."""
    groups: dict[str, list[TrialPoint]] = {}
    for p in pts:
        groups.setdefault(FAMILY_SYMBOLS.get(_family(p), OTHER_FAMILY_SYMBOL)[1], []).append(p)
    return groups


def png_figure(points: Sequence[TrialPoint], front: list[TrialPoint], recs: Mapping[str, TrialPoint | None],
               title: str, max_latency_ms: float | None, hv_line: str) -> Any:
    """pareto.png's matplotlib Figure: the HTML's zoomed view (:func:`zoom_ranges`), colour = state, marker shape =
    family (the HTML's shapes), the picks, a legend beside the axes; every trial when there is no front."""
    # Figure + Agg canvas directly (not pyplot): no global backend switch inside the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import PercentFormatter

    fig = Figure(figsize=(12, 7), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    handles: list[Any] = []

    def legend_marker(label: str, marker: str, color: str, **kw: Any) -> None:
        handles.append(Line2D([], [], ls="none", marker=marker, color=color, label=label, **{"markersize": 8, **kw}))

    front_numbers = {p.number for p in front}
    for state in [*STATES, *sorted({p.state for p in points} - set(STATES))]:
        pts = [p for p in points if p.state == state and p.number not in front_numbers
               and is_finite(p.latency_ms) and _plot_acc(p) is not None]
        if not pts:
            continue
        color = STATE_COLORS.get(state, "#8c564b")
        for marker, group in _family_groups(pts).items():
            ax.scatter([p.latency_ms for p in group], [_plot_acc(p) for p in group], s=30, marker=marker,
                       color=color, alpha=0.8 if state == "COMPLETE" else 0.5)
        legend_marker(state if state != "PRUNED" else "PRUNED (at last accuracy)", "o", color)
    if front:
        xs, ys = [p.latency_ms for p in front], [p.val_acc for p in front]
        ax.step(xs, ys, where="post", color=FRONT_COLOR, lw=2)
        bars = _error_bars(front)
        if bars:
            ax.errorbar(xs, ys, xerr=[bars["error_x"]["arrayminus"], bars["error_x"]["array"]],
                        yerr=[bars["error_y"]["arrayminus"], bars["error_y"]["array"]], fmt="none",
                        ecolor=FRONT_COLOR, elinewidth=1, capsize=2, alpha=0.7)
        for marker, group in _family_groups(front).items():
            ax.scatter([p.latency_ms for p in group], [p.val_acc for p in group], s=70, marker=marker,
                       color=FRONT_COLOR, edgecolors="black", zorder=3)
        for p in front:
            ax.annotate(str(p.number), (p.latency_ms, p.val_acc), textcoords="offset points", xytext=(6, -12),
                        fontsize=8, annotation_clip=True)
        handles.append(Line2D([], [], color=FRONT_COLOR, lw=2, marker="o", markerfacecolor=FRONT_COLOR,
                              markeredgecolor="black", label="Pareto front (shape = family)"))
    for key in RECOMMENDATION_KEYS:
        p = recs.get(key)
        if p is None:
            continue
        _, marker, color, size = PICK_STYLE[key]
        open_ = marker != "*"
        ax.scatter([p.latency_ms], [p.val_acc], marker=marker, s=size * 14, zorder=4,
                   facecolors="none" if open_ else color, edgecolors=color if open_ else "black", linewidths=2)
        legend_marker(f"{PICK_LABEL[key]} (trial {p.number})", marker, color if not open_ else "none",
                      markeredgecolor=color if open_ else "black", markeredgewidth=2, markersize=13)
    for family in sorted({_family(p) for p in points if is_finite(p.latency_ms) and _plot_acc(p) is not None}):
        legend_marker(f"family: {family}", FAMILY_SYMBOLS.get(family, OTHER_FAMILY_SYMBOL)[1], "#444")
    ranges = zoom_ranges(points, front)
    notes = [hv_line]
    if ranges is not None:
        ax.set_xlim(*ranges[0])
        ax.set_ylim(*ranges[1])
        title = f"{title}: the front and the students near it (zoomed)"
        notes.insert(0, _outside_text(outside_view(points, ranges)))
    if max_latency_ms is not None:
        beyond = ranges is not None and not ranges[0][0] <= max_latency_ms <= ranges[0][1]
        ax.axvline(max_latency_ms, ls="--", color="#555")
        handles.append(Line2D([], [], ls="--", color="#555", label=f"latency budget {max_latency_ms:g} ms"
                              + (" (outside this view)" if beyond else "")))
    ax.set_xlabel("latency (ms, batch 1) - lower is better")
    ax.set_ylabel("validation accuracy - higher is better")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=11)
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def _png(points: Sequence[TrialPoint], front: list[TrialPoint], recs: Mapping[str, TrialPoint | None],
         title: str, max_latency_ms: float | None, hv_line: str) -> bytes:
    buf = io.BytesIO()
    png_figure(points, front, recs, title, max_latency_ms, hv_line).savefig(buf, format="png")
    return buf.getvalue()


# ---------------------------------------------------------------- HTML / CSV / Markdown

_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function (th) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0];
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var asc = th.getAttribute('data-dir') !== 'asc';
    th.parentNode.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-dir'); });
    th.setAttribute('data-dir', asc ? 'asc' : 'desc');
    function key(row) { var c = row.cells[col]; return c ? (c.getAttribute('data-v') || c.textContent) : ''; }
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
      if (x === '' || y === '') { return x === y ? 0 : (x === '' ? 1 : -1); }  // blanks last
      var r = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? r : -r;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 16px 24px; color: #222; }
h1 { font-size: 22px; margin: 0 0 2px; } h2 { font-size: 18px; margin: 20px 0 6px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.why { white-space: normal; min-width: 20em; }
th { background: #f3f3f3; }
table.sortable th { cursor: pointer; user-select: none; }
th[data-dir=asc]::after { content: ' \\25B2'; } th[data-dir=desc]::after { content: ' \\25BC'; }
/* A wide table scrolls inside its box, never the page; its trial column stays in view. */
.scroll { overflow-x: auto; max-width: 100%; margin: 6px 0 20px; }
table.sortable td:first-child, table.sortable th:first-child { position: sticky; left: 0; z-index: 1;
  box-shadow: inset -1px 0 #ddd; }
table.sortable td:first-child { background: #fff; }
.glyph { font-size: 15px; } .meta { color: #555; } code { background: #f6f6f6; padding: 1px 3px; }
"""


def _with_interval(value: str, interval: str) -> str:
    return value if interval == "-" else f"{value} ({interval})"


def _picks_table(recs: Mapping[str, TrialPoint | None], tie_map: Mapping[int, list[int]],
                 max_latency_ms: float | None, tolerance_pp: float, best_acc: float | None) -> str:
    """report.html's recommendations: one row per pick, its trial's figures and one line on why it was picked."""
    head = ("pick", "trial", "family", "val acc % (95% CI)", "test acc %", "latency ms (interval)", "why")
    rows = []
    for key in RECOMMENDATION_KEYS:
        color = PICK_STYLE[key][2]
        glyph = f'<span class="glyph" style="color:{color}">{PICK_GLYPH[key]}</span>'
        cells = [f"<td>{glyph} {html.escape(PICK_LABEL[key])}</td>"]
        rule = _pick_rule(key, max_latency_ms, tolerance_pp, best_acc)
        p = recs.get(key)
        if p is None:
            why = ("not requested: pass --max-latency-ms" if key == "best_under_latency" and max_latency_ms is None
                   else f"no front member fits ({rule})")
            cells += ['<td class="num">-</td>', *["<td></td>"] * 4, f'<td class="why">{html.escape(why)}</td>']
        else:
            test = _pct(p.test_acc) + (f" (int8 {_pct(p.int8_test_acc)})" if is_finite(p.int8_test_acc) else "")
            tied = tie_map.get(p.number)
            why = rule + (f"; tied with trial {', '.join(map(str, tied))} (see Ties below)" if tied else "")
            cells += [f'<td class="num" title="{html.escape(_params_text(p.params))}">{p.number}</td>',
                      f"<td>{html.escape(_family(p))}</td>",
                      f'<td class="num">{_with_interval(_pct(p.val_acc), _acc_ci(p.acc_ci))}</td>',
                      f'<td class="num">{html.escape(test)}</td>',
                      f'<td class="num">{_with_interval(_ms(p.latency_ms), _lat_ci(p.latency_ci))}</td>',
                      f'<td class="why">{html.escape(why)}</td>']
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ('<table class="picks"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _html(points: Sequence[TrialPoint], front: list[TrialPoint], table: Table, title: str, summary: str,
          plots: tuple[str, str], picks: str, hv_line: str) -> str:
    """The page: the front's plot first, then the recommendations, then the tables and the full view.

    ``plots``: the top plot's HTML (it carries plotly.js) and the full view's below (empty when the top one is it).
    """
    top_plot, full_plot = plots
    unplotted = [p for p in points if not (is_finite(p.latency_ms) and _plot_acc(p) is not None)]
    unplotted_html = ("<p class=meta>Not plotted (no accuracy or latency): "
                      + ", ".join(f"trial {p.number} ({html.escape(p.state)})" for p in unplotted) + "</p>"
                      if unplotted else "")
    full_html = f"<h2>Every trial (full view)</h2>\n{full_plot}" if full_plot else ""
    # Every trial: its "tied with" stays empty (ties are among the front, whose table shows them).
    every = _html_table(sorted(points, key=lambda p: p.number), Table(table.recommendations), ALL_TRIALS)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta" id="summary">{html.escape(summary)}</p>
{top_plot}
<h2 id="recommendations">Recommendations</h2>
<div class="scroll">{picks}</div>
<h2>Pareto front ({len(front)} trials, click a header to sort)</h2>
<div class="scroll">{_html_table(front, table, HTML)}</div>
<p class="meta">Ties: {html.escape(TIE_RULE)}. Error bars are these intervals.</p>
<p class="meta">{html.escape(hv_line)}</p>
{full_html}
{unplotted_html}
<details><summary>All trials ({len(points)})</summary>
<div class="scroll">{every}</div>
</details>
<script>{_SORT_JS}</script>
</body></html>
"""


def _markdown(front: list[TrialPoint], table: Table, title: str, counts: Mapping[str, int], hv_line: str,
              pick_lines: list[str]) -> str:
    lines = [f"# {title}", "", _counts_text(counts), "", "## Recommendations", ""]
    lines += [f"- {_md_cell(t)}" for t in pick_lines]
    lines += ["", f"Ties: {TIE_RULE}.", ""]
    lines += ["", "## Hypervolume", "", hv_line, "", f"## Pareto front ({len(front)} trials)", ""]
    if front:
        lines += _markdown_table(front, table)
        if _has_int8(front):
            lines += ["", "Latency is that of each student's INT8 model (--latency-precision int8); fp32 and int8 "
                      "test %: its fp32 and INT8 ONNX models under ONNX Runtime on the full test split."]
    else:
        lines.append("Empty: no COMPLETE trial with finite accuracy and latency.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- entry point

def write_report(points: Sequence[TrialPoint], out_dir: Path, *, title: str, max_latency_ms: float | None = None,
                 tolerance_pp: float = 1.0, hv_ref: tuple[float, float] | None = None) -> ReportResult:
    """Compute the front, picks and hypervolume of ``points`` and write the report files under ``out_dir``.

    Files: ``report.html`` (interactive, fully offline: plotly.js inlined), ``pareto.png``, ``front.csv``,
    ``summary.md``. ``hv_ref = (accuracy, latency_ms)`` overrides the default reference point (see module doc).
    """
    points = list(points)
    if hv_ref is None:
        ref, ref_default = default_hv_ref(points), True
    else:
        ref, ref_default = check_hv_ref(hv_ref), False
    front = front_points(points)
    recs = recommend(front, max_latency_ms=max_latency_ms, tolerance_pp=tolerance_pp)
    hv = hypervolume(front, ref)
    counts = _counts(points)
    hv_line = _hv_text(hv, ref, ref_default)
    best_acc = max((p.val_acc for p in front), default=None)  # type: ignore[type-var]
    pick_lines = [_pick_text(k, recs[k], max_latency_ms, tolerance_pp, best_acc) for k in RECOMMENDATION_KEYS]
    tie_map = ties(front)
    for i, k in enumerate(RECOMMENDATION_KEYS):
        if (r := recs[k]) is not None and tie_map.get(r.number):
            pick_lines[i] += (f" (tied with trial(s) {', '.join(map(str, tie_map[r.number]))}: not told apart by the "
                              "intervals, see Ties)")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"displaylogo": False, "responsive": True}
    # The zoomed view of the front opens the page (it carries plotly.js); the full view of every trial comes below.
    zoomed = zoom_ranges(points, front) is not None
    top = _plotly_figure(points, front, recs, title, max_latency_ms, zoom=zoomed, height=TOP_PLOT_HEIGHT)
    top_plot = top.to_html(full_html=False, include_plotlyjs=True, div_id="pareto-zoom" if zoomed else "pareto-plot",
                           config=config)
    full_plot = _plotly_figure(points, front, recs, title, max_latency_ms).to_html(
        full_html=False, include_plotlyjs=False, div_id="pareto-plot", config=config) if zoomed else ""
    table = Table(recs, tie_map)
    summary = (f"{_counts_text(counts)}; Pareto front: {len(front)} trials; hypervolume {hv:.4g} "
               "(reference point below)")
    picks = _picks_table(recs, tie_map, max_latency_ms, tolerance_pp, best_acc)
    outputs = {
        "report.html": _html(points, front, table, title, summary, (top_plot, full_plot), picks, hv_line).encode(),
        "pareto.png": _png(points, front, recs, title, max_latency_ms, hv_line),
        "front.csv": _csv(front, table),
        "summary.md": _markdown(front, table, title, counts, hv_line, pick_lines).encode(),
    }
    files = []
    for name, data in outputs.items():
        path = out_dir / name
        atomic_write_bytes(path, data)
        files.append(path)
    return ReportResult(front=front, recommendations=recs, hypervolume=hv, hv_ref=ref, files=files, counts=counts,
                        ties=tie_map)

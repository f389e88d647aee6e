from __future__ import annotations

import csv
import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from browser import Browser, chromium

from autokd.report.render import (
    FAMILY_SYMBOLS,
    FRONT_COLOR,
    ReportResult,
    format_front_table,
    outside_view,
    png_figure,
    write_report,
    zoom_ranges,
)
from autokd.select.pareto import TrialPoint, front_points, recommend

FILES = ["report.html", "pareto.png", "front.csv", "summary.md"]


def make_points() -> list[TrialPoint]:
    """A small synthetic study: a 4-point front, dominated completes, pruned/failed/infeasible/running trials."""
    pts = [
        TrialPoint(101, "COMPLETE", 0.55, 0.8, {"family": "mobilenetv3", "width": 0.25, "loss": "kd", "temperature": 2.0}, 0.54),
        TrialPoint(102, "COMPLETE", 0.91, 1.6, {"family": "resnet", "width": 0.5, "loss": "dkd", "beta": 8.0}, 0.90),
        TrialPoint(103, "COMPLETE", 0.93, 4.0, {"family": "convnext", "width": 0.75, "loss": "kd"}, 0.92),
        TrialPoint(104, "COMPLETE", 0.94, 9.0, {"family": "vit", "width": 1.0, "loss": "hint", "opt": {"lr": 0.01}}, None),
        TrialPoint(105, "COMPLETE", 0.80, 3.0, {"family": "regnet", "width": 0.5, "loss": "mse"}, 0.79),
        TrialPoint(106, "COMPLETE", 0.85, 6.5, {"family": "efficientnet", "width": 0.5, "loss": "ce"}, 0.84),
        TrialPoint(107, "PRUNED", None, 2.2, {"family": "resnet", "width": 0.25, "loss": "kd"}, last_val_acc=0.42),
        TrialPoint(108, "PRUNED", None, 5.0, {"family": "vit", "width": 0.5, "loss": "kd"}),  # no last accuracy
        TrialPoint(109, "FAIL", None, 3.3, {"family": "convnext", "width": 1.0, "loss": "dkd"}),
        TrialPoint(110, "INFEASIBLE", None, 40.0, {"family": "vit", "width": 1.0, "loss": "kd"}),
        TrialPoint(111, "RUNNING", None, None, {"family": "resnet", "width": 1.0, "loss": "kd"}),
    ]
    return pts


FRONT_NUMBERS = [101, 102, 103, 104]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReportResult, Path]:
    out = tmp_path_factory.mktemp("report") / "nested" / "report"
    result = write_report(make_points(), out, title="digits <study> & co", max_latency_ms=5.0, tolerance_pp=1.5)
    return result, out


def test_files_written_atomically(report: tuple[ReportResult, Path]) -> None:
    result, out = report
    assert [p.name for p in result.files] == FILES
    assert sorted(os.listdir(out)) == sorted(FILES)  # no temporary files left behind
    assert all((out / f).stat().st_size > 0 for f in FILES)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_result_front_picks_and_hypervolume(report: tuple[ReportResult, Path]) -> None:
    result, _ = report
    assert [p.number for p in result.front] == FRONT_NUMBERS
    recs = {k: (v.number if v else None) for k, v in result.recommendations.items()}
    # best val acc 0.94, tolerance 1.5 pp -> floor 0.925: trials 103 and 104 qualify, 103 is faster
    assert recs == {"knee": 102, "best_under_latency": 103, "fastest_within_tolerance": 103}
    # default reference: accuracy 0, latency 1.1 * 9.0 (slowest COMPLETE) = 9.9 ms
    assert result.hv_ref == pytest.approx((0.0, 9.9))
    # (1.6-0.8)*0.55 + (4-1.6)*0.91 + (9-4)*0.93 + (9.9-9)*0.94 = 0.44 + 2.184 + 4.65 + 0.846 = 8.12
    assert result.hypervolume == pytest.approx(8.12)
    assert result.counts == {"COMPLETE": 6, "PRUNED": 2, "FAIL": 1, "INFEASIBLE": 1, "RUNNING": 1}


def test_html_lists_every_trial_and_is_offline(report: tuple[ReportResult, Path]) -> None:
    _, out = report
    text = (out / "report.html").read_text()
    for p in make_points():
        assert f'data-v="{p.number}">{p.number}</td>' in text, p.number
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?\s*(https?:)?//", text, re.I)
    assert not re.search(r"<link[^>]*\bhref\s*=\s*[\"']?\s*(https?:)?//", text, re.I)
    assert len(text) > 1_000_000 and "Plotly.newPlot" in text  # plotly.js inlined, not referenced
    assert "digits &lt;study&gt; &amp; co" in text and "<study>" not in text
    assert "reference point" in text and "9.9 ms" in text
    assert "table.sortable" in text  # the inline sorting script
    assert "Not plotted" in text and "trial 108 (PRUNED)" in text and "trial 110 (INFEASIBLE)" in text
    assert "trial 107" not in text.split("Not plotted")[1].split("</p>")[0]  # drawn at its last accuracy
    # The page opens on the zoomed plot, then the picks, then the front's table; the full view after them.
    order = [text.index(s) for s in ('id="pareto-zoom"', 'id="recommendations"', "<h2>Pareto front",
                                     'id="pareto-plot"', "<summary>All trials")]
    assert order == sorted(order)
    assert text.count("Plotly.newPlot") == 2 and text.count("window.PlotlyConfig") == 1  # plotly.js inlined once


def test_recommendations_table_has_one_row_per_pick(report: tuple[ReportResult, Path]) -> None:
    _, out = report
    text = (out / "report.html").read_text()
    picks = text.split('<table class="picks">')[1].split("</table>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", picks.split("<tbody>")[1])
    cells = [[html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r)]
             for r in rows]
    assert [c[0][2:] for c in cells] == ["knee", "best under latency", "fastest within tolerance"]
    knee, best, fastest = cells
    assert knee[1:5] == ["102", "resnet", "91.00", "90.00"]  # no intervals in these points: the bare figures
    assert knee[6] == "largest distance to the line between the front's extremes"
    assert best[1] == "103" and best[6] == "most accurate with latency <= 5 ms"
    assert fastest[1] == "103" and fastest[6] == "fastest within 1.5 pp of the best 94.00%"


def test_csv_has_front_rows(report: tuple[ReportResult, Path]) -> None:
    _, out = report
    with open(out / "front.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in rows] == FRONT_NUMBERS
    assert {"val_acc", "test_acc", "latency_ms", "recommendations", "param.family", "param.opt.lr"} <= set(rows[0])
    by_num = {int(r["number"]): r for r in rows}
    assert by_num[102]["recommendations"] == "knee"
    assert by_num[103]["recommendations"] == "best_under_latency;fastest_within_tolerance"
    assert by_num[104]["test_acc"] == "" and float(by_num[104]["param.opt.lr"]) == 0.01
    assert float(by_num[101]["val_acc"]) == 0.55


def test_summary_mentions_recommendations(report: tuple[ReportResult, Path]) -> None:
    _, out = report
    md = (out / "summary.md").read_text()
    assert "knee" in md and "trial 102" in md
    assert "best under latency (latency <= 5 ms): trial 103" in md
    assert "fastest within tolerance (within 1.5 pp" in md
    assert "hypervolume 8.12" in md and "reference point (accuracy 0, latency 9.9 ms" in md
    assert "6 COMPLETE, 2 PRUNED, 1 FAIL, 1 INFEASIBLE, 1 RUNNING" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(FRONT_NUMBERS)  # header + one row per front trial


def test_format_front_table(report: tuple[ReportResult, Path]) -> None:
    result, _ = report
    text = format_front_table(result.front, result.recommendations)
    lines = text.splitlines()
    assert len(lines) == 2 + len(FRONT_NUMBERS)
    assert lines[0].split()[:2] == ["trial", "val", "acc"][:2]
    assert "best_under_latency,fastest_within_tolerance" in text and "knee" in text
    assert "91.00" in text and "1.600" in text
    assert "\x1b[" not in text  # plain text


def test_hv_ref_override_and_empty_study(tmp_path: Path) -> None:
    res = write_report(make_points(), tmp_path / "a", title="t", hv_ref=(0.5, 10.0))
    assert res.hv_ref == (0.5, 10.0)
    # (1.6-0.8)*0.05 + (4-1.6)*0.41 + (9-4)*0.43 + (10-9)*0.44 = 0.04 + 0.984 + 2.15 + 0.44 = 3.614
    assert res.hypervolume == pytest.approx(3.614)
    assert res.recommendations["best_under_latency"] is None
    assert "given by the caller" in (tmp_path / "a" / "summary.md").read_text()

    only_bad = [TrialPoint(1, "PRUNED", None, 2.0, {}, last_val_acc=0.3), TrialPoint(2, "FAIL", None, None, {})]
    res2 = write_report(only_bad, tmp_path / "b", title="empty")
    assert res2.front == [] and res2.hypervolume == 0.0
    assert all(v is None for v in res2.recommendations.values())
    assert "Empty" in (tmp_path / "b" / "summary.md").read_text()
    assert len((tmp_path / "b" / "front.csv").read_text().splitlines()) == 1  # header only
    assert "empty" in format_front_table([], res2.recommendations)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@pytest.mark.slow
def test_report_renders_in_headless_browser(report: tuple[ReportResult, Path], tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    _, out = report
    url = (out / "report.html").resolve().as_uri()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
              "--virtual-time-budget=5000"]
    dom = subprocess.run([*common, f"--user-data-dir={tmp_path / 'p1'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "main-svg" in dom.stdout and "scatterlayer" in dom.stdout
    # one rendered point per plotted trial: 3 non-front trials with accuracy + 4 front + 3 pick markers
    assert dom.stdout.count('class="point"') >= 10

    png = tmp_path / "shot.png"
    shot = subprocess.run([*common, f"--user-data-dir={tmp_path / 'p2'}", f"--screenshot={png}",
                           "--window-size=1200,900", url], capture_output=True, text=True, timeout=180)
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    import numpy as np
    from matplotlib.image import imread

    img = imread(png)
    colors = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colors) > 50, f"screenshot looks blank ({len(colors)} distinct colours)"


def test_intervals_and_ties_in_every_report_file(tmp_path: Path) -> None:
    # Trials 1 and 2 overlap on both axes (tied); 3 is clearly slower and more accurate. 2 is faster than 1 by less
    # than their intervals and has more parameters: "fastest" must not choose it on that difference.
    pts = [
        TrialPoint(1, "COMPLETE", 0.905, 1.00, {"family": "resnet"}, param_count=1000,
                   acc_ci=(0.875, 0.935), latency_ci=(0.97, 1.03)),
        TrialPoint(2, "COMPLETE", 0.900, 0.99, {"family": "regnet"}, param_count=5000,
                   acc_ci=(0.87, 0.93), latency_ci=(0.96, 1.02)),
        TrialPoint(3, "COMPLETE", 0.990, 3.00, {"family": "vit"}, param_count=9000,
                   acc_ci=(0.97, 0.997), latency_ci=(2.9, 3.1)),
    ]
    res = write_report(pts, tmp_path, title="ties", tolerance_pp=10.0)
    assert [p.number for p in res.front] == [2, 1, 3]
    assert res.recommendations["fastest_within_tolerance"].number == 1  # tied with 2, fewer parameters
    with open(tmp_path / "front.csv", newline="") as f:
        rows = {int(r["number"]): r for r in csv.DictReader(f)}
    assert rows[1]["tied_with"] == "2" and rows[2]["tied_with"] == "1" and rows[3]["tied_with"] == ""
    assert float(rows[3]["latency_low_ms"]) == 2.9 and float(rows[3]["val_acc_high"]) == 0.997
    md = (tmp_path / "summary.md").read_text()
    assert "| 1 | 90.50 | 87.50-93.50 |" in md and "0.970-1.030 | 2 |" in md
    assert "Ties: front members whose intervals overlap on both axes" in md and "fewest parameters" in md
    page = (tmp_path / "report.html").read_text()
    assert '"error_x"' in page and '"error_y"' in page and "arrayminus" in page  # error bars in the plot
    assert "Ties: front members" in page
    table = format_front_table(res.front, res.recommendations)
    assert "0.970-1.030" in table and "tied with" in table


def test_int8_study_shows_fp32_and_int8_test_accuracy(tmp_path: Path) -> None:
    # A --latency-precision int8 study: study_report puts each front member's fp32 and INT8 test accuracy (ONNX
    # Runtime) into its fields; every report file shows them as their own columns. Without them, no such columns.
    q = {"fp32_test_acc": 0.9125, "int8_test_acc": 0.9050}
    pts = [TrialPoint(1, "COMPLETE", 0.90, 1.0, {"family": "resnet"}, 0.91, **q),
           TrialPoint(2, "COMPLETE", 0.95, 2.0, {"family": "vit"}, 0.94,
                      fp32_test_acc=0.9375, int8_test_acc=0.875),
           TrialPoint(3, "COMPLETE", 0.50, 3.0, {"family": "regnet"}, None)]  # dominated: not computed
    res = write_report(pts, tmp_path, title="int8")
    with open(tmp_path / "front.csv", newline="") as f:
        rows = {int(r["number"]): r for r in csv.DictReader(f)}
    assert set(rows) == {1, 2}
    assert float(rows[1]["fp32_test_acc"]) == 0.9125 and float(rows[2]["int8_test_acc"]) == 0.875
    assert "extra.int8_test_acc" not in rows[1] and float(rows[1]["test_acc"]) == 0.91
    md = (tmp_path / "summary.md").read_text()
    assert "| test acc % | fp32 test % | int8 test % | latency ms |" in md
    assert "| 91.00 | 91.25 | 90.50 | 1.000 |" in md and "--latency-precision int8" in md
    page = (tmp_path / "report.html").read_text()
    assert "<th>fp32 test %</th><th>int8 test %</th>" in page
    assert "test acc (ONNX Runtime): fp32 93.75%, int8 87.50%" in page  # hover
    table = format_front_table(res.front, res.recommendations).splitlines()
    assert "fp32 test %  int8 test %" in table[0]
    assert [line.split()[4:6] for line in table[2:]] == [["91.25", "90.50"], ["93.75", "87.50"]]

    plain = write_report([TrialPoint(1, "COMPLETE", 0.9, 1.0, {"family": "resnet"}, 0.91)], tmp_path / "p", title="p")
    assert "int8" not in (tmp_path / "p" / "front.csv").read_text() + (tmp_path / "p" / "summary.md").read_text()
    assert "int8" not in format_front_table(plain.front, plain.recommendations)


def test_every_table_of_the_front_has_the_same_columns(report: tuple[ReportResult, Path]) -> None:
    # One column definition drives them: the terminal and summary.md show the same headers; report.html's front table
    # shows them too (plus its first measurement), one column per parameter in place of "params".
    result, out = report
    terminal = re.split(r"\s{2,}", format_front_table(result.front, result.recommendations).splitlines()[0].strip())
    md_header = next(line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| trial"))
    markdown = [h.strip() for h in md_header.strip("|").split("|")]
    page = (out / "report.html").read_text()
    front_table = page.split("<h2>Pareto front")[1].split("</table>")[0]
    html_headers = re.findall(r"<th>(.*?)</th>", front_table)
    assert terminal == markdown and markdown[-1] == "params"
    assert [h for h in html_headers if h != "first ms"][:len(markdown) - 1] == markdown[:-1]
    assert "family" in html_headers[len(markdown):] and "first ms" in html_headers


def test_ties_are_computed_once_per_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autokd.report import render

    calls = []
    real = render.ties
    monkeypatch.setattr(render, "ties", lambda front: calls.append(len(front)) or real(front))
    pts = [TrialPoint(1, "COMPLETE", 0.905, 1.00, {}, acc_ci=(0.875, 0.935), latency_ci=(0.97, 1.03)),
           TrialPoint(2, "COMPLETE", 0.900, 0.99, {}, acc_ci=(0.87, 0.93), latency_ci=(0.96, 1.02))]
    res = write_report(pts, tmp_path, title="ties")
    assert calls == [2] and res.ties == {1: [2], 2: [1]}
    rows = format_front_table(res.front, res.recommendations, res.ties).splitlines()[2:]
    assert calls == [2] and [r.split()[6] for r in rows] == ["1", "2"]  # the report's ties, not computed again


def _points_outside_the_zoom() -> list[TrialPoint]:
    """make_points plus a student pruned at 10 % (below the front's band) and a slow dominated one (past 3x the
    front's slowest member): the zoomed view leaves exactly these two out."""
    return [*make_points(), TrialPoint(120, "PRUNED", None, 2.0, {"family": "regnet"}, last_val_acc=0.10),
            TrialPoint(121, "COMPLETE", 0.90, 30.0, {"family": "efficientnet"})]


def test_zoom_stays_within_0_and_100_percent() -> None:
    wide = [TrialPoint(1, "COMPLETE", 0.10, 1.0, {}), TrialPoint(2, "COMPLETE", 0.995, 2.0, {})]
    _, (y_lo, y_hi) = zoom_ranges(wide, front_points(wide))
    assert -0.01 <= y_lo < 0.10 and 0.995 < y_hi <= 1.01


def test_png_is_the_zoomed_view_with_a_shape_per_family(tmp_path: Path) -> None:
    import numpy as np
    from matplotlib.colors import to_rgba
    from matplotlib.markers import MarkerStyle

    points = _points_outside_the_zoom()
    front = front_points(points)
    ranges = zoom_ranges(points, front)
    assert sorted(p.number for p in outside_view(points, ranges)) == [120, 121]
    fig = png_figure(points, front, recommend(front), "t", None, "hv")
    ax = fig.axes[0]
    assert ax.get_xlim() == pytest.approx(ranges[0]) and ax.get_ylim() == pytest.approx(ranges[1])
    assert "2 trial(s) outside this view (120, 121)" in " ".join(t.get_text() for t in fig.texts)

    def marker_vertices(marker: str) -> np.ndarray:
        style = MarkerStyle(marker)
        return style.get_path().transformed(style.get_transform()).vertices

    # Each front member is drawn in the front's colour with its family's marker, the shape the HTML plot gives it.
    front_sets = [c for c in ax.collections if len(c.get_facecolors())
                  and np.allclose(c.get_facecolors()[0], to_rgba(FRONT_COLOR))]
    for p in front:
        (drawn,) = [c for c in front_sets if any(np.allclose(o, (p.latency_ms, p.val_acc)) for o in c.get_offsets())]
        assert np.allclose(drawn.get_paths()[0].vertices, marker_vertices(FAMILY_SYMBOLS[p.params["family"]][1]))
    legend = {h.get_label(): h.get_marker() for h in ax.get_legend().legend_handles}
    families = ("resnet", "mobilenetv3", "efficientnet", "regnet", "convnext", "vit")  # each has a trial drawn
    assert {k: v for k, v in legend.items() if k.startswith("family: ")} == {
        f"family: {f}": FAMILY_SYMBOLS[f][1] for f in families}
    assert "Pareto front (shape = family)" in legend and "knee (trial 102)" in legend


def _wide_points() -> list[TrialPoint]:
    """make_points with a dozen long parameter names: the front's table is wider than a 1400-pixel page."""
    points = make_points()
    for p in points:
        p.params.update({f"schedule.warmup_phase_{i}_fraction_of_steps": round(0.01 * i + p.number / 1e4, 4)
                         for i in range(12)})
    return points


_LAYOUT = """(() => {
  const d = document.documentElement, plot = document.getElementById('pareto-zoom');
  const picks = document.getElementById('recommendations'), table = document.querySelector('table.sortable');
  return {scrollWidth: d.scrollWidth, clientWidth: d.clientWidth, innerWidth: window.innerWidth,
          innerHeight: window.innerHeight, tableWidth: table.scrollWidth,
          plotFirst: Boolean(plot.compareDocumentPosition(picks) & Node.DOCUMENT_POSITION_FOLLOWING),
          plotTop: plot.getBoundingClientRect().top,
          picksBottom: document.querySelector('table.picks').getBoundingClientRect().bottom};
})()"""


@pytest.mark.slow
def test_report_page_opens_on_the_plot_and_picks_without_sideways_scroll(tmp_path: Path) -> None:
    if chromium() is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    write_report(_wide_points(), tmp_path / "r", title="wide", max_latency_ms=5.0)
    browser = Browser(tmp_path / "profile")
    try:
        browser.set_viewport(1400, 1000)
        browser.goto((tmp_path / "r" / "report.html").resolve().as_uri())
        assert browser.wait_for("document.querySelectorAll('#pareto-zoom .main-svg').length > 0"), "no plot drawn"
        layout = browser.evaluate(_LAYOUT)
        browser.evaluate("document.querySelector('details').open = true")  # every trial's table, as wide
        opened = browser.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    finally:
        browser.close()
    assert layout["innerWidth"] == 1400
    assert layout["tableWidth"] > layout["clientWidth"]  # the front's table is wider than the page...
    assert layout["scrollWidth"] <= layout["clientWidth"], layout  # ...yet the page does not scroll sideways
    assert opened[0] <= opened[1], opened
    assert layout["plotFirst"] and layout["plotTop"] < 150, layout  # the plot under the title
    assert layout["picksBottom"] <= layout["innerHeight"], layout  # the picks in view without scrolling

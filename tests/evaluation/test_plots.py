"""`expqa plots`: the page of dvc.yaml's charts plus base vs tuned, drawn by a real browser with the network off."""

import json
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser

import pytest
import yaml

from expqa.evaluation import plots
from helpers import REPO

NEEDS_CHROMIUM = pytest.mark.skipif(
    plots.find_browser() is None, reason="no chromium: apt-get install -y chromium (Debian/Ubuntu)"
)
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class DrawnMarks(HTMLParser):
    """Per chart (a div with an id in the page's .charts grid): the marks its SVG draws, and any error it shows."""

    def __init__(self):
        super().__init__()
        self.open: list[tuple[str, str, str | None]] = []  # (tag, class, chart id) of each unclosed element
        self.marks: Counter[str] = Counter()
        self.errors: dict[str, str] = {}
        self.in_error: str | None = None
        self.no_rows: set[str] = set()  # charts that say their file has no rows instead of drawing

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        parent_tag, parent_class, chart = self.open[-1] if self.open else ("", "", None)
        if tag == "div" and "charts" in parent_class.split() and attrs.get("id"):
            chart = attrs["id"]
            self.marks[chart] += 0
        if "role-mark" in parent_class.split():  # a line, bar, point or rule drawn from data
            self.marks[chart] += 1
        if "chart-error" in (attrs.get("class") or ""):
            self.in_error = chart
        if "no-rows" in (attrs.get("class") or ""):
            self.no_rows.add(chart)
        if tag not in VOID_TAGS:
            self.open.append((tag, attrs.get("class") or "", chart))

    def handle_endtag(self, tag):
        if tag not in VOID_TAGS and self.open:
            self.open.pop()

    def handle_data(self, data):
        if self.in_error:
            self.errors[self.in_error] = data
            self.in_error = None


def declared_plots() -> int:
    """Charts dvc.yaml declares: top-level plots + every stage's plots entries."""
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    return len(pipeline.get("plots", [])) + sum(len(stage.get("plots", [])) for stage in pipeline["stages"].values())


def curves_without_rows() -> set[str]:
    """The chart ids (DVC's: the path with / and . as _) of stage plot files in this checkout that hold a header and
    no rows, as the align stage writes them when it is off."""
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    files = [next(iter(p)) for stage in pipeline["stages"].values() for p in stage.get("plots", [])]
    empty = [f for f in files if len((REPO / f).read_text().strip().splitlines()) < 2]
    return {f.replace("/", "_").replace(".", "_") for f in empty}


def test_base_vs_tuned_takes_every_nested_pair_with_its_interval():
    metrics = {
        "perplexity": {
            "base": 29.2,
            "tuned": 19.9,
            "base_ci95_lo": 21.1,
            "base_ci95_hi": 40.4,
            "tuned_ci95_lo": 14.7,
            "tuned_ci95_hi": 27.0,
            "n": 16,
        },
        "critical_questions": {"questions": 204, "calibrated": {"base": 0.25, "tuned": 0.24}},
        "stop_rate": {"base": "n/a", "tuned": 0.0},  # not a number: not a metric to draw
        "test_examples": 16,
    }
    rows = plots.base_vs_tuned(metrics)
    assert rows == [
        {"metric": "perplexity", "model": "base", "value": 29.2, "lo": 21.1, "hi": 40.4},
        {"metric": "perplexity", "model": "tuned", "value": 19.9, "lo": 14.7, "hi": 27.0},
        {"metric": "critical_questions.calibrated", "model": "base", "value": 0.25, "lo": 0.25, "hi": 0.25},
        {"metric": "critical_questions.calibrated", "model": "tuned", "value": 0.24, "lo": 0.24, "hi": 0.24},
    ]


def test_eval_chart_draws_an_x_axis_in_each_panel_and_none_under_an_empty_slot():
    """The committed report has 11 metrics in a grid of 6 columns: with the x axes shared, Vega-Lite drew one per
    column under the last row, so the sixth hung under an empty slot (the empty panel of `make plots`)."""
    vl_convert = pytest.importorskip("vl_convert")
    report = json.loads((REPO / plots.EVAL_REPORT).read_text())
    rows = [{"rev": "workspace", **row} for row in plots.base_vs_tuned(report)]
    metrics = {row["metric"] for row in rows}
    assert len(metrics) % plots.eval_spec(rows)["columns"], "the grid is full: this test would show nothing"
    svg = vl_convert.vegalite_to_svg(plots.eval_spec(rows))
    assert svg.count(">base</text>") == svg.count(">tuned</text>") == len(metrics)  # one labelled x axis each


def test_compared_revisions_are_dvc_plots_diffs_with_the_workspace_first():
    assert plots.compared_revisions([]) == ["workspace"]
    assert plots.compared_revisions(["HEAD~1"]) == ["workspace", "HEAD~1"]
    assert plots.compared_revisions(["main", "my-exp"]) == ["main", "my-exp"]


def test_plots_subcommand_has_help():
    result = subprocess.run(
        [sys.executable, "-m", "expqa.cli", "plots", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0 and "expqa plots" in result.stdout and "--screenshot" in result.stdout


@NEEDS_CHROMIUM
def test_the_browser_is_offline(tmp_path):
    """The harness itself: DVC's default page (Vega from a CDN) gets no Vega in this browser."""
    from dvc_render.vega import VegaRenderer

    page = tmp_path / "cdn.html"
    page.write_text(
        f"<html><head>{VegaRenderer.SCRIPTS}</head><body><p id='vega'></p>"
        "<script>document.getElementById('vega').textContent = typeof vegaEmbed;</script></body></html>"
    )
    assert '<p id="vega">undefined</p>' in plots.open_offline(page, "--dump-dom")


@pytest.mark.slow
@NEEDS_CHROMIUM
def test_page_draws_every_chart_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the checkout's own dvc.yaml and metrics/, as `make plots` sees them
    page = plots.write_page([], tmp_path / "plots")
    drawn = DrawnMarks()
    drawn.feed(plots.open_offline(page, "--dump-dom"))
    assert not drawn.errors, drawn.errors
    assert set(drawn.marks) >= {plots.EVAL_CHART_ID}
    assert len(drawn.marks) == declared_plots() + 1, sorted(drawn.marks)
    # a curve file without rows says so in one line; every other chart draws marks
    assert drawn.no_rows == curves_without_rows()
    empty = [chart for chart, count in drawn.marks.items() if count == 0 and chart not in drawn.no_rows]
    assert not empty, f"charts drawn without marks: {empty}"

"""Plots that draw without internet: `dvc plots show` / `dvc plots diff` plus base vs tuned, on one HTML page.

DVC's page loads Vega, Vega-Lite and Vega-Embed from a CDN, so it stays blank offline. `write_page` hands DVC an
HTML template (`--html-template`) that carries these libraries inline, bundled by the pinned vl-convert-python
package, and one chart DVC cannot draw from a metrics file: every metric of the evaluation report with a `base` and
a `tuned` value, with its 95 % interval, for each compared revision. The charts themselves stay in dvc.yaml.

    expqa plots                      # the workspace (as `dvc plots show`)
    expqa plots HEAD~1               # HEAD~1 vs the workspace (as `dvc plots diff`)
    expqa plots main my-exp          # two commits, branches or `dvc exp` names
    expqa plots --screenshot docs/plots.png   # also a PNG of the page, drawn by headless chromium
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# DVC 3's templates write Vega-Lite v5 specs: the bundle carries the newest v5 that vl-convert ships
VEGA_LITE_VERSION = "5.21"
WORKSPACE = "workspace"  # DVC's name for the uncommitted files
# the evaluate stage's report (dvc.yaml: --out): a plain output, not a DVC metric (metrics/headline.json is, without
# intervals), read at each revision as `dvc metrics show metrics/eval.json` does
EVAL_REPORT = "metrics/eval.json"
EVAL_CHART_ID = "eval-base-vs-tuned"
DVC_COLORS = ["#945dd6", "#13adc7", "#f46837", "#48bb78", "#4299e1", "#ed8936", "#f56565"]  # dvc_render's
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# a browser that can reach nothing: the page must draw from what it carries
OFFLINE_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)
# DVC fills these in a template: the inlined libraries must not contain them
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>expqa plots: {title}</title>
<script>/* Vega {vega}, Vega-Lite {vega_lite}, Vega-Embed {vega_embed}: bundled by vl-convert-python */
{bundle}
</script>
<script>
// SVG, so that every mark is an element (crisp screenshots, countable in tests); a chart that fails says why.
// DVC gives a curve file without rows (align's, with align.enabled false) an empty spec: say so instead of an
// empty frame
const bundledEmbed = window.vegaEmbed;
window.vegaEmbed = (el, spec, opt) => {{
  if (!spec || !spec.data) {{
    document.querySelector(el).insertAdjacentHTML("beforeend", "<p class='no-rows'></p>");
    document.querySelector(el + " .no-rows").textContent =
      el.slice(1) + ": no rows (the stage that writes it did not run or was off)";
    return Promise.resolve();
  }}
  return bundledEmbed(el, spec, Object.assign({{renderer: "svg"}}, opt))
    .catch(err => {{ document.querySelector(el).insertAdjacentHTML("beforeend",
      "<pre class='chart-error'></pre>"); document.querySelector(el + " .chart-error").textContent = String(err); }});
}};
</script>
<style>
body {{ font-family: sans-serif; margin: 16px; }}
.charts {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 16px; }}
#eval-base-vs-tuned {{ grid-column: 1 / -1; }}
.chart-error {{ color: #b00; white-space: pre-wrap; }}
.no-rows {{ color: #666; }}
</style>
</head>
<body>
<h2>expqa plots: {title}</h2>
<div class="charts">
{eval_chart}
{{plot_divs}}
</div>
</body>
</html>
"""


def compared_revisions(revs: list[str]) -> list[str]:
    """The revisions `dvc plots diff REV...` draws, in its order (so in its colours): one is compared with the
    workspace, none is the workspace alone (`dvc plots show`); the workspace comes first."""
    revisions = list(revs) if len(revs) > 1 else [*revs, WORKSPACE]
    return sorted(revisions, key=lambda rev: rev != WORKSPACE)


def base_vs_tuned(metrics: dict, prefix: str = "") -> list[dict]:
    """Every metric (nested dict) with numeric `base` and `tuned`: one row per model, with its 95 % interval."""
    rows = []
    for key, value in metrics.items():
        if not isinstance(value, dict):
            continue
        name = f"{prefix}{key}"
        if isinstance(value.get("base"), (int, float)) and isinstance(value.get("tuned"), (int, float)):
            for model in ("base", "tuned"):
                rows.append(
                    {
                        "metric": name,
                        "model": model,
                        "value": value[model],
                        "lo": value.get(f"{model}_ci95_lo", value[model]),
                        "hi": value.get(f"{model}_ci95_hi", value[model]),
                    }
                )
        rows += base_vs_tuned(value, prefix=f"{name}.")
    return rows


def eval_rows(revisions: list[str]) -> list[dict]:
    """base_vs_tuned of the evaluation report at each revision (branch, commit, tag, experiment, workspace); a
    revision without one has no rows."""
    import dvc.api
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import RevError

    try:
        Repo.find_root()  # outside one, metrics_show tries to clone the folder and fails in a long traceback
    except NotDvcRepoError:
        raise SystemExit("error: not inside a DVC repository; cd into the expqa checkout first") from None
    rows = []
    for rev in revisions:
        try:
            metrics = dvc.api.metrics_show(EVAL_REPORT, rev=None if rev == WORKSPACE else rev)
        except RevError as err:
            raise SystemExit(f"error: {err}: give commits, branches, tags or names from `dvc exp list`") from None
        except FileNotFoundError:  # no evaluate run at that revision: its charts still draw
            continue
        rows += [{"rev": rev, **row} for row in base_vs_tuned(metrics)]
    return rows


def eval_spec(rows: list[dict]) -> dict:
    """Bars (base, tuned) with 95 % intervals, one small chart per metric (own y scale: perplexity vs ROUGE)."""
    # revisions coloured as in DVC's charts, next to each other under "base" and under "tuned"
    encoding = {
        "x": {"field": "model", "type": "nominal", "title": None, "axis": {"labelAngle": 0}},
        "xOffset": {"field": "rev", "type": "nominal", "sort": None},
        "color": {"field": "rev", "type": "nominal", "sort": None, "scale": {"range": DVC_COLORS}},
    }
    tooltip = [
        {"field": "rev"},
        {"field": "metric"},
        {"field": "model"},
        *({"field": f, "type": "quantitative", "format": ".4g"} for f in ("value", "lo", "hi")),
    ]
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": "Evaluation: base vs tuned (bars: value, lines: 95 % interval)",
        "data": {"values": rows},
        "facet": {"field": "metric", "type": "nominal", "title": None, "sort": None},
        "columns": 6,
        "spec": {
            "width": 90,
            "height": 90,
            "layer": [
                {
                    "mark": "bar",
                    "encoding": {
                        **encoding,
                        "y": {"field": "value", "type": "quantitative", "title": None},
                        "tooltip": tooltip,
                    },
                },
                {
                    "mark": {"type": "rule", "color": "black"},
                    "encoding": {
                        **encoding,
                        "color": {"value": "black"},
                        "y": {"field": "lo", "type": "quantitative"},
                        "y2": {"field": "hi"},
                    },
                },
            ],
        },
        # an x axis in every chart: shared, Vega-Lite draws one per grid column under the last row, so with 11
        # metrics in 6 columns the sixth column's axis hung under an empty slot (an empty panel in `make plots`)
        "resolve": {"scale": {"y": "independent"}, "axis": {"x": "independent"}},
    }


def javascript_bundle() -> str:
    try:
        import vl_convert
    except ImportError:
        raise SystemExit(
            "error: expqa plots needs vl-convert-python: pip install -e '.[plots]' (make install does)"
        ) from None

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    # DVC would replace a placeholder inside the code, and "</script" would end the <script> element early
    if any(text in bundle for text in (*DVC_PLACEHOLDERS, "</script")):
        raise RuntimeError(
            f"the Vega bundle of vl-convert-python contains one of {DVC_PLACEHOLDERS} or </script; "
            "pin another vl-convert-python version in pyproject.toml"
        )
    # in a function, so that its top-level names cannot clash with DVC's `var spec` in the chart scripts
    return f"(function () {{\n{bundle}\n}})();"


def page_template(title: str, rows: list[dict]) -> str:
    import vl_convert

    eval_chart = ""
    if rows:
        spec = json.dumps(eval_spec(rows)).replace("</", "<\\/")  # a metric name cannot close the <script>
        eval_chart = f'<div id="{EVAL_CHART_ID}"></div>\n<script>vegaEmbed("#{EVAL_CHART_ID}", {spec});</script>'
    return PAGE.format(
        title=title,
        bundle=javascript_bundle(),
        eval_chart=eval_chart,
        vega=vl_convert.get_vega_version(),
        vega_lite=VEGA_LITE_VERSION,
        vega_embed=vl_convert.get_vega_embed_version(),
    )


def write_page(revs: list[str], out: Path) -> Path:
    """out/index.html: DVC's plots (`show` for the workspace, `diff` for revisions) and base vs tuned."""
    revisions = compared_revisions(revs)
    rows = eval_rows(revisions)
    if not rows:
        print(f"note: no metric with base and tuned values at {', '.join(revisions)} (run `dvc repro evaluate`)")
    command = ["plots", "diff", *revs] if revs else ["plots", "show"]
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "template.html"
        template.write_text(page_template(" vs ".join(revisions), rows), encoding="utf-8")
        subprocess.run(
            [sys.executable, "-m", "dvc", *command, "--html-template", str(template), "-o", str(out)], check=True
        )
    return out / "index.html"


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def open_offline(page: Path, *flags: str) -> str:
    """Run headless chromium, without network, on the page (10 s of page time to draw); its stdout."""
    browser = find_browser()
    if browser is None:
        raise SystemExit("error: this needs chromium (Debian/Ubuntu: apt-get install -y chromium)")
    done = subprocess.run(
        [browser, *OFFLINE_FLAGS, "--virtual-time-budget=10000", *flags, page.resolve().as_uri()],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 1200) -> None:
    """PNG of the page as an offline browser draws it (a window tall enough for every chart)."""
    png.parent.mkdir(parents=True, exist_ok=True)
    open_offline(page, "--hide-scrollbars", f"--window-size={width},{height}", f"--screenshot={png.resolve()}")
    print(f"wrote {png}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expqa plots", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "revisions",
        nargs="*",
        help="commits, branches, tags or `dvc exp` names to compare (one: vs the workspace; none: the workspace alone)",
    )
    parser.add_argument("-o", "--out", type=Path, default=Path("dvc_plots"), help="folder for index.html")
    parser.add_argument("--screenshot", type=Path, metavar="PNG", help="also write a PNG of the page (chromium)")
    args = parser.parse_args(argv)
    page = write_page(args.revisions, args.out)
    if args.screenshot:
        screenshot(page, args.screenshot)
    return 0

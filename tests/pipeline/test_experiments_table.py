"""`dvc exp show` and `make exps` in a 120-column terminal, with the project's own dvc.yaml declarations.

A throwaway git + DVC project gets the shipped params.yaml and dvc.yaml with every stage's command replaced by a
tiny script that writes the stage's outputs in their real shape: the committed metrics files, their numbers moved
by a digest of the stage's inputs (so the base model's numbers stay put and the rest differ between experiments, as
in real runs), and the headline made from that report by the evaluate stage's own `headline`. Deps that no stage
makes (sources, data files) are left out; the ones between stages stay, so `-S lora.r=32` re-runs train and what
follows, through the params stage's metrics/params/train.json, as in the real pipeline. Then two experiments.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO, write_params

pytestmark = pytest.mark.slow  # `dvc repro` of 10 stages and two `dvc exp run`s (~40 s on 2 cores)

WIDTH = 120
SHOWN = ["cq.p", "cq.tuned", "ppl.p", "ppl.tuned", "rougeL.p", "rougeL.tuned"]  # what `make exps` keeps
MOVING = SHOWN + [f"{m}.{k}" for m in ("cq", "ppl", "rougeL") for k in ("sft", "p_vs_sft")]  # all but base values
FAKE_STAGE = """\
import hashlib, json, sys
from pathlib import Path

import yaml

stage = sys.argv[1]
spec = yaml.safe_load(Path("dvc.yaml").read_text())["stages"][stage]
everyone_reads = [dep for other in yaml.safe_load(Path("dvc.yaml").read_text())["stages"].values()
                  for dep in other.get("deps", [])]


def name(entry):
    return entry if isinstance(entry, str) else next(iter(entry))


def content(path):
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return b"".join(str(p).encode() + p.read_bytes() for p in files)


def moved(value, factor, key=""):
    if isinstance(value, dict):
        return {k: moved(v, factor, k if not key else key + "." + k) for k, v in value.items()}
    if isinstance(value, float) and "base" not in key:  # the base model is the same in every experiment
        return min(value * factor, 1.0) if key.endswith("p_value") else value * factor
    return value


digest = hashlib.md5(b"".join(content(name(dep)) for dep in spec.get("deps", []))).hexdigest()
factor = 1 + (int(digest[:4], 16) / 0xFFFF - 0.5) / 50  # within +-1 %
params = yaml.safe_load(Path("params.yaml").read_text())
for out in [name(o) for kind in ("outs", "metrics", "plots") for o in spec.get(kind, [])]:
    path, shipped = Path(out), Path("shipped", out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if stage == "params":  # the sections each stage reads, as the real params stage writes them (no profile here)
        from expqa.config import STAGE_SECTIONS

        sections = {}
        for entry in STAGE_SECTIONS[path.stem]:
            section, _, key = entry.partition(".")
            sections.setdefault(section, {}).update({key: params[section][key]} if key else params[section])
        path.write_text(json.dumps(sections, sort_keys=True))
    elif out == "metrics/headline.json":
        from expqa.evaluation.evaluate import headline  # imports torch: only here

        report = moved(json.loads(Path("shipped/metrics/eval.json").read_text()), factor)
        path.write_text(json.dumps(headline(report), sort_keys=True))
    elif shipped.suffix == ".json" and shipped.is_file():
        path.write_text(json.dumps(moved(json.loads(shipped.read_text()), factor), sort_keys=True))
    elif shipped.is_file():
        path.write_bytes(shipped.read_bytes())
    elif path.suffix:
        path.write_text(digest)
    else:  # a folder: the files other stages read in it, or one
        path.mkdir(exist_ok=True)
        for read in [dep for dep in everyone_reads if dep.startswith(out + "/")] or [out + "/made"]:
            Path(read).write_text(digest)
"""


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd}: {result.stdout}\n{result.stderr}"
    return result.stdout


def fake_pipeline(dvc_yaml: dict) -> dict:
    """dvc.yaml with each stage running fake_stage.py, its declarations (outs, metrics, plots, params) kept, and its
    deps cut down to what another stage writes."""
    stages = dvc_yaml["stages"]
    made = [next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for k in ("outs", "metrics", "plots")
            for o in s.get(k, [])]  # fmt: skip
    for name, stage in stages.items():
        stage["cmd"] = f"python fake_stage.py {name}"
        stage["deps"] = ["fake_stage.py", "shipped"] + [
            dep for dep in stage.get("deps", []) if any(dep == out or dep.startswith(out + "/") for out in made)
        ]
    return {"stages": stages}


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> tuple[Path, dict]:
    project = tmp_path_factory.mktemp("exps")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "COLUMNS": str(WIDTH),  # rich, which draws DVC's tables, takes the width from it (dvc has no --width)
    }
    write_params(project / "params.yaml")
    pipeline = fake_pipeline(yaml.safe_load((REPO / "dvc.yaml").read_text()))
    (project / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    for path in (REPO / "metrics").rglob("*"):  # the committed metrics, reports and plot files
        if path.is_file():
            (project / "shipped" / path.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
            (project / "shipped" / path.relative_to(REPO)).write_bytes(path.read_bytes())
    (project / "fake_stage.py").write_text(FAKE_STAGE)
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "repro", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "baseline"],
        ["dvc", "exp", "run", "-q", "-n", "rank32", "-S", "lora.r=32"],
        ["dvc", "exp", "run", "-q", "-n", "rank8", "-S", "lora.r=8"],
    ):
        run(cmd, project, env)
    return project, env


def assert_fits(out: str) -> list[str]:
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= WIDTH and "…" not in out, out
    return lines


def header(lines: list[str]) -> list[str]:
    return next(line.split() for line in lines if line.strip().startswith("Experiment"))


def test_exp_show_only_changed_fits_120_columns(experiments):
    project, env = experiments
    # the dependencies between stages that an experiment changes are hash columns (32 characters each) that never
    # fit: dropped by path, as README "Experiments" says
    deps = "(metrics/params|models|data)/"
    out = run(["dvc", "exp", "show", "--only-changed", "--no-pager", "--drop", deps], project, env)
    lines = assert_fits(out)
    # the headline's tuned values move with lora.r (its p-values where the change crosses a rounding step), the base
    # model's values do not
    columns = header(lines)
    assert columns[:2] == ["Experiment", "Created"] and columns[-1] == "lora.r", out
    assert {"cq.tuned", "ppl.tuned", "rougeL.tuned"} <= set(columns[2:-1]) <= set(MOVING), out
    for name, rank in (("rank32", "32"), ("rank8", "8")):
        assert any(f"[{name}]" in line and line.split()[-1] == rank for line in lines), out
    # without --drop: the same columns in full, then what of the three hashes fits, the rest folded into "…"
    hashes = [
        "metrics/params/align.json",
        "metrics/params/train.json",
        "models/adapter",
        "models/aligned",
        "models/merged",
    ]
    csv = run(["dvc", "exp", "show", "--only-changed", "--csv"], project, env).splitlines()[0].split(",")
    assert [column for column in csv if "/" in column] == hashes
    whole = run(["dvc", "exp", "show", "--only-changed", "--no-pager"], project, env).splitlines()
    shown = header(whole)
    assert max(len(line) for line in whole) <= WIDTH and shown[: len(columns)] == columns, "\n".join(whole)
    assert set(shown[len(columns) :]) <= {*hashes, "…"}, "\n".join(whole)


def test_metrics_diff_lists_the_headline_only(experiments):
    project, env = experiments
    out = run(["dvc", "metrics", "diff", "--no-path", "HEAD", "rank32"], project, env)
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]  # metric, old, new, change
    assert {"cq.tuned", "ppl.tuned", "rougeL.tuned"} <= {row[0] for row in rows} <= set(MOVING), out
    assert all(float(row[3]) != 0 for row in rows), out  # rounded: a row is a real change, never "-0.0"


def test_make_exps_shows_key_metrics_and_changed_params_within_120_columns(experiments):
    project, env = experiments
    # -o install: the target's venv prerequisite is this test's interpreter, already installed
    out = run(["make", "-s", "-f", str(REPO / "Makefile"), "-o", "install", "exps"], project, env)
    lines = assert_fits(out)
    assert header(lines) == ["Experiment", *SHOWN]
    for name in ("rank32", "rank8"):
        assert sum(f"[{name}]" in line for line in lines) == 1, out
    params = out[out.index("\nParam") :].strip().split("\n\n")
    assert sorted([line.split() for line in block.splitlines()] for block in params) == [
        [["Param", "HEAD", "rank32"], ["lora.r", "16", "32"]],
        [["Param", "HEAD", "rank8"], ["lora.r", "16", "8"]],
    ], out

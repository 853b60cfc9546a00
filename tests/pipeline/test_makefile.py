"""`make exps`: the experiments table fits 120 columns and shows the changed params and the key metrics only.

A throwaway DVC project with the shipped params.yaml and one stage that writes the shipped metrics files (shifted by
lora.r and train.learning_rate, so every metric differs between experiments, as in real runs), two experiments run
with `dvc exp run -S`, then the Makefile's own target.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import REPO, write_params

pytestmark = pytest.mark.slow  # `dvc repro` and two `dvc exp run`s

METRICS = ["metrics/eval.json", "metrics/train/metrics.json", "metrics/merge.json", "metrics/collect.json"]
FAKE_STAGE = """\
import json, os, yaml
params = yaml.safe_load(open("params.yaml"))
shift = params["lora"]["r"] / 1000 + params["train"]["learning_rate"]

def shifted(d):
    return {k: shifted(v) if isinstance(v, dict) else v + shift if isinstance(v, float) else v for k, v in d.items()}

os.makedirs("metrics/train", exist_ok=True)
for path in {metrics}:
    json.dump(shifted(json.load(open("shipped/" + path))), open(path, "w"), indent=2)
"""


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{cmd}: {result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> tuple[Path, dict]:
    project = tmp_path_factory.mktemp("exps")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "COLUMNS": "120",
    }
    write_params(project / "params.yaml")
    for path in METRICS:
        (project / "shipped" / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / path, project / "shipped" / path)
    (project / "fake_stage.py").write_text(FAKE_STAGE.replace("{metrics}", repr(METRICS)))
    (project / "dvc.yaml").write_text(
        textwrap.dedent(f"""\
        stages:
          fake:
            cmd: python fake_stage.py
            deps: [fake_stage.py, shipped]
            params: [lora, train]
            metrics: {[{path: {"cache": False}} for path in METRICS]}
        """)
    )
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "repro", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "baseline"],
        ["dvc", "exp", "run", "-q", "-n", "rank32", "-S", "lora.r=32"],
    ):
        run(cmd, project, env)
    run(["dvc", "exp", "run", "-q", "-n", "rank8-lr", "-S", "lora.r=8", "-S", "train.learning_rate=1e-4"], project, env)
    return project, env


def test_make_exps_shows_key_metrics_and_changed_params_within_120_columns(experiments):
    project, env = experiments
    # -o install: the target's venv prerequisite is this test's interpreter, already installed
    out = run(["make", "-s", "-f", str(REPO / "Makefile"), "-o", "install", "exps"], project, env)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 120 and "…" not in out, out
    # columns in the order of dvc.yaml's metrics files, experiments newest first in the tables
    headers = [sorted(line.split()) for line in lines if line.strip().startswith("Experiment")]
    assert headers == [
        sorted(["Experiment", "eval.loss", "train.loss", "perplexity.delta", "rougeL.delta"]),
        ["Experiment", "critical_questions.calibrated.delta", "critical_questions.length_norm.delta"],
    ]
    for name in ("rank32", "rank8-lr"):  # a row in each table
        assert sum(f"[{name}]" in line for line in lines) == 2, out
    params = out[out.index("\nParam") :].strip().split("\n\n")
    assert sorted([line.split() for line in block.splitlines()] for block in params) == [
        [["Param", "HEAD", "rank32"], ["lora.r", "16", "32"]],
        [["Param", "HEAD", "rank8-lr"], ["lora.r", "16", "8"], ["train.learning_rate", "0.0002", "0.0001"]],
    ], out

"""`expqa verify` / `make check-repro`: the workspace's key metrics vs the committed ones, within tolerances.

A temporary git repository with the project's metrics files committed; the workspace copy is then changed by an
amount derived from verify's own tolerance table (half of a tolerance inside, twice or one more outside), so the
tests follow the table when its numbers are replaced.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from expqa.workspace.verify import CANNOT_COMPARE, OK, OUTSIDE, TOLERANCES, Tolerance, expand, label, lookup, verify
from helpers import REPO

FILES = list(dict.fromkeys(metric.file for metric in TOLERANCES))


def committed(name: str) -> str:
    """A file of the project as committed (HEAD), not as a `dvc repro` under way leaves the workspace."""
    return subprocess.run(["git", "show", f"HEAD:{name}"], cwd=REPO, capture_output=True, text=True, check=True).stdout


# every compared metric as (file, concrete key, tolerance), keys expanded against the project's metrics files
CASES = [
    (metric.file, key, tolerance)
    for metric, tolerance in TOLERANCES.items()
    for key in expand(metric.key, json.loads(committed(metric.file)))
]
ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
    "GIT_CONFIG_NOSYSTEM": "1",
}


@pytest.fixture
def repo(tmp_path) -> Path:
    """The project's metrics files (plus dvc.yaml and params.yaml, which mark a checkout), committed."""
    for name in [*FILES, "dvc.yaml", "params.yaml"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(committed(name))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "run"]):
        subprocess.run(cmd, cwd=tmp_path, env=ENV, check=True)
    return tmp_path


def edit(repo: Path, file: str, key: str, change) -> None:
    """Replace the workspace value at a dotted key by change(old value)."""
    data = json.loads((repo / file).read_text())
    *path, last = key.split(".")
    block = data
    for part in path:
        block = block[part]
    block[last] = change(block[last])
    (repo / file).write_text(json.dumps(data, indent=2))


def block_size(repo: Path, file: str, key: str) -> int | None:
    """The `n` next to an accuracy (its number of questions), for of_n tolerances."""
    return lookup(json.loads((repo / file).read_text()), key.rpartition(".")[0] + ".n")


def inside(value, tolerance: Tolerance, n: int | None):
    """A change within the tolerance: half of it (none for exact)."""
    return {
        "relative": lambda: value * (1 + tolerance.amount / 2),
        "absolute": lambda: value + tolerance.amount / 2,
        "of_n": lambda: value + math.floor(tolerance.amount / 2) / n,
        "exact": lambda: value,
    }[tolerance.kind]()


def outside(value, tolerance: Tolerance, n: int | None):
    """A change beyond the tolerance: twice it, or one item more (of_n, exact)."""
    return {
        "relative": lambda: value * (1 + 2 * tolerance.amount),
        "absolute": lambda: value + 2 * tolerance.amount,
        "of_n": lambda: value + (tolerance.amount + 1) / n,
        "exact": lambda: value + 1,
    }[tolerance.kind]()


def name(file: str, key: str) -> str:
    return f"{label(file)}: {key}"


def rows(out: str) -> dict[str, list[str]]:
    """metric name -> its line's columns (workspace, committed, difference, tolerance, result)."""
    split = [re.split(r"\s{2,}", line) for line in out.splitlines()]
    return {cells[0]: cells[1:] for cells in split if len(cells) == 6 and cells[0] != "metric"}


def test_the_table_covers_the_key_results_in_at_most_15_lines():
    names = [name(file, key) for file, key, _ in CASES]
    assert len(names) == len(set(names)) <= 15, names
    for wanted in ("train.loss", "eval.loss", "perplexity.tuned", "rougeL.tuned", "calibrated.tuned", "greedy_flips"):
        assert any(name.endswith(wanted) for name in names), wanted


def test_an_unchanged_workspace_passes(repo, capsys):
    assert verify(repo) == OK
    out = capsys.readouterr().out
    found = rows(out)
    assert list(found) == [name(file, key) for file, key, _ in CASES], out
    assert all(cells[2:] == ["0", cells[3], "ok"] and cells[0] == cells[1] for cells in found.values()), out
    assert out.splitlines()[-1].startswith(f"ok: all {len(CASES)} metrics within tolerance of HEAD (cpu profile)")
    assert "byte-identical" in out.splitlines()[-1]


def test_changes_inside_every_tolerance_pass(repo, capsys):
    for file, key, tolerance in CASES:
        n = block_size(repo, file, key)
        edit(repo, file, key, lambda value, t=tolerance, n=n: inside(value, t, n))
    assert verify(repo) == OK, capsys.readouterr().out
    out = capsys.readouterr().out
    found = rows(out)
    assert [cells[-1] for cells in found.values()] == ["ok"] * len(CASES), out
    moved = [name(file, key) for file, key, tolerance in CASES if tolerance.kind != "exact"]
    assert all(found[metric][2] != "0" for metric in moved), out  # each non-exact metric did change
    assert "byte-identical" not in out


@pytest.mark.parametrize(("file", "key", "tolerance"), CASES, ids=[f"{file}:{key}" for file, key, _ in CASES])
def test_a_change_outside_a_tolerance_fails_naming_the_metric(repo, capsys, file, key, tolerance):
    edit(repo, file, key, lambda value: outside(value, tolerance, block_size(repo, file, key)))
    assert verify(repo) == OUTSIDE
    out = capsys.readouterr().out
    found = rows(out)
    assert found.pop(name(file, key))[-1] == "OUTSIDE", out
    assert [cells[-1] for cells in found.values()] == ["ok"] * (len(CASES) - 1), out
    last = out.splitlines()[-1]
    assert last.startswith(f"OUTSIDE: 1 of {len(CASES)} metrics") and last.endswith(f": {name(file, key)}"), out


def test_a_missing_metrics_file_says_nothing_ran(repo, capsys):
    (repo / "metrics/eval.json").unlink()
    (repo / "metrics/export.json").unlink()
    assert verify(repo) == CANNOT_COMPARE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("error: metrics/eval.json, metrics/export.json missing in the workspace")
    assert "run `dvc repro`" in captured.err


def test_runs_of_different_profiles_are_not_compared(repo, capsys):
    edit(repo, "metrics/train/metrics.json", "profile", lambda _: "gpu")
    assert verify(repo) == CANNOT_COMPARE
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert "the workspace ran the gpu profile, HEAD the cpu profile" in captured.err
    assert "not comparable" in captured.err


def test_a_revision_without_the_files_or_no_revision_at_all(repo, capsys):
    subprocess.run(["git", "rm", "-q", "--cached", "metrics/eval.json"], cwd=repo, env=ENV, check=True)
    subprocess.run(["git", "commit", "-qm", "drop"], cwd=repo, env=ENV, check=True)
    assert verify(repo) == CANNOT_COMPARE
    assert capsys.readouterr().err == (
        "error: metrics/eval.json not committed at HEAD: pass --rev <a commit with a pipeline run>\n"
    )
    assert verify(repo, "HEAD~1") == OK
    capsys.readouterr()
    assert verify(repo, "no-such-branch") == CANNOT_COMPARE
    assert capsys.readouterr().err.startswith("error: no-such-branch is not a commit")


def test_make_check_repro_runs_expqa_verify_and_fails_outside(repo):
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    make = ["make", "-s", "-f", str(REPO / "Makefile"), "-o", "install", "check-repro"]  # -o: this venv is installed
    passed = subprocess.run(make, cwd=repo, env=env, capture_output=True, text=True)
    assert passed.returncode == 0 and "ok: all" in passed.stdout, passed.stdout + passed.stderr
    edit(repo, "metrics/train/metrics.json", "train.loss", lambda value: value * 2)
    failed = subprocess.run([*make, "CHECK_REV=HEAD"], cwd=repo, env=env, capture_output=True, text=True)
    assert failed.returncode != 0, failed.stdout
    assert "train: train.loss" in failed.stdout.splitlines()[-1], failed.stdout

"""`expqa` command line: every subcommand has help, and the stage subcommands work from any folder."""

import subprocess
import sys

import pytest

from expqa.cli import STAGES
from helpers import REPO


def expqa(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "expqa.cli", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.slow
def test_help_lists_every_subcommand_and_each_has_help():
    result = expqa("--help")
    assert result.returncode == 0
    for name in [*STAGES, "ask", "chat", "serve", "params", "plots", "verify", "pull"]:
        assert name in result.stdout
    for name in [*STAGES, "ask", "chat", "serve", "params", "plots", "verify", "pull"]:
        sub = expqa(name, "--help")
        assert sub.returncode == 0 and f"expqa {name}" in sub.stdout, sub.stderr


def test_stage_subcommands_work_outside_a_checkout(tmp_path):
    result = expqa("merge", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "expqa merge" in result.stdout
    result = expqa("merge", "--base", "b", "--adapter", "a", "--out", "o", "--report", "r.json", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, "error: b does not exist; build it with `dvc repro base`\n")


def test_output_cut_short_by_the_reader_is_not_a_traceback():
    """`expqa params | head -3`: the reader closes the pipe early; expqa stops quietly (no BrokenPipeError trace)."""
    from helpers import REPO

    reader = subprocess.Popen(["head", "-3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    writer = subprocess.run(
        [sys.executable, "-m", "expqa.cli", "params"], cwd=REPO, stdout=reader.stdin, stderr=subprocess.PIPE, text=True
    )
    reader.stdin.close()
    assert len(reader.stdout.read().splitlines()) == 3
    reader.wait()
    assert "Traceback" not in writer.stderr and "BrokenPipeError" not in writer.stderr, writer.stderr
    assert writer.returncode in (0, 1)

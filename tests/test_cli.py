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
    for name in [*STAGES, "ask", "chat", "serve", "llama-serve", "params", "plots", "verify", "pull"]:
        assert name in result.stdout
    for name in [*STAGES, "ask", "chat", "serve", "llama-serve", "params", "plots", "verify", "pull"]:
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


def not_a_model_command(name: str, folder: str, out: str) -> list[str]:
    """`expqa <name>` with `folder` (one that is not a model) as every model it reads; outputs in out."""
    params = ["--params", str(REPO / "params.yaml")]
    return {
        "ask": ["ask", "What is CUPED?", "--model", folder],
        "chat": ["chat", "--model", folder],
        "serve": ["serve", "--model", folder, "--port", "0"],
        "stats": ["stats", "--data", out, "--base", folder, "--out", f"{out}/s.json", "--histogram", f"{out}/h.csv"]
        + params,
        "train": ["train", "--base", folder, "--data", out, "--out", f"{out}/a", "--checkpoints", f"{out}/c"]
        + ["--metrics", f"{out}/m", "--log-folder", f"{out}/l", *params],
        "align": ["align", "--base", folder, "--adapter", folder, "--preferences", out, "--questions", out]
        + ["--data", out, "--out", f"{out}/a", "--report", f"{out}/r.json", "--quarantine", f"{out}/q.json"]
        + ["--checkpoints", f"{out}/c", "--metrics", f"{out}/m", "--log-folder", f"{out}/l", *params],
        "merge": ["merge", "--base", folder, "--adapter", folder, "--out", f"{out}/m", "--report", f"{out}/m.json"],
        "evaluate": ["evaluate", "--base", folder, "--sft", folder, "--tuned", folder, "--test", out, "--train", out]
        + ["--out", f"{out}/e.json", "--examples", f"{out}/x.json", "--plot", f"{out}/p.json"]
        + ["--headline", f"{out}/h.json", *params],
        "export": ["export", "--model", folder, "--out", f"{out}/g", "--report", f"{out}/r.json"]
        + ["--timings", f"{out}/t.json", *params],
    }[name]


@pytest.mark.parametrize("name", ["ask", "chat", "serve", "stats", "train", "align", "merge", "evaluate", "export"])
def test_a_folder_that_is_not_a_model_is_one_line_in_every_command(name, tmp_path, monkeypatch, capsys):
    """An empty folder (an interrupted `dvc pull`, the wrong folder) used to fail deep in transformers."""
    from expqa.cli import main

    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(not_a_model_command(name, "empty", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: empty has no config.json") and err.count("\n") == 1, err


@pytest.mark.parametrize("name", ["verify", "pull", "plots"])
def test_commands_outside_a_checkout_are_one_line(name, tmp_path, monkeypatch, capsys):
    from expqa.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([name]) == 2  # the status of the other known errors
    err = capsys.readouterr().err
    assert err.startswith("error: not inside") and err.count("\n") == 1, err

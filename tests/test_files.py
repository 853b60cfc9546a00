"""File helpers: atomic directory swaps, and reports split into tracked metrics and wall-clock figures."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from expqa.files import atomic_dir, is_wall_clock, output_path_problems, split_wall_clock
from helpers import REPO


def test_split_wall_clock_moves_timings_at_every_depth():
    report = {
        "passed": True,
        "seconds": 39.7,
        "types": {"f16": {"bytes": 10, "write_seconds": 3.0}},
        "train_runtime": 5.0,
        "train_samples_per_second": 1.0,
        "total_flos": 1e12,
        "eval": {"loss": 2.0},
    }
    kept, clock = split_wall_clock(report)
    assert kept == {"passed": True, "types": {"f16": {"bytes": 10}}, "eval": {"loss": 2.0}}
    assert clock == {
        "seconds": 39.7,
        "types": {"f16": {"write_seconds": 3.0}},
        "train_runtime": 5.0,
        "train_samples_per_second": 1.0,
        "total_flos": 1e12,
    }
    assert not is_wall_clock("eval_loss") and is_wall_clock("real_tokens_per_second")


def test_tracked_metrics_hold_no_wall_clock_values():
    """Every metrics file dvc.yaml declares, as committed: nothing that differs between two runs of the same inputs
    (a fresh clone's `make repro` leaves git clean, and `dvc metrics diff` lists only real changes)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    files = [
        next(iter(entry)) if isinstance(entry, dict) else entry
        for stage in stages.values()
        for entry in stage.get("metrics", [])
    ]
    assert files
    for name in files:
        path = REPO / name
        if not path.exists():
            pytest.skip(f"{name} not built yet (dvc repro)")

        def keys(node, prefix=""):
            for key, value in node.items():
                yield prefix + key
                if isinstance(value, dict):
                    yield from keys(value, prefix + key + ".")

        clock = [key for key in keys(json.loads(path.read_text())) if is_wall_clock(key.rsplit(".", 1)[-1])]
        assert not clock, f"{name}: {clock}"


def _output_with(parent: Path, files: dict[str, str]) -> Path:
    out = parent / "out"
    out.mkdir(parents=True)
    for name, text in files.items():
        (out / name).write_text(text)
    return out


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_atomic_dir_swap_replaces_the_old_output_and_leaves_nothing_beside_it(tmp_path):
    out = _output_with(tmp_path, {"old.txt": "old"})
    with atomic_dir(out) as work:
        assert work.parent == out.parent and work != out and not any(work.iterdir())
        (work / "new.txt").write_text("new")
        assert _contents(out) == {"old.txt": "old"}  # the old output stays readable until the swap
    assert _contents(out) == {"new.txt": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_keeps_the_old_output_when_the_block_raises(tmp_path):
    out = _output_with(tmp_path, {"old.txt": "old"})
    with pytest.raises(RuntimeError, match="check failed"):
        with atomic_dir(out) as work:
            (work / "new.txt").write_text("half written")
            raise RuntimeError("check failed")
    assert _contents(out) == {"old.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_puts_the_old_output_back_when_the_swap_fails(tmp_path):
    out = _output_with(tmp_path, {"old.txt": "old"})
    with pytest.raises(FileNotFoundError):
        with atomic_dir(out) as work:
            shutil.rmtree(work)  # the rename onto out_dir now fails after out_dir was moved aside
    assert _contents(out) == {"old.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_atomic_dir_permissions_follow_the_umask_not_mkdtemps_0700(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "new" / "out") as work:  # missing parents are made
            (work / "f.txt").write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "new" / "out").stat().st_mode) == 0o777 & ~umask


def test_atomic_dir_carries_over_only_the_chosen_entries_of_the_old_output(tmp_path):
    out = _output_with(tmp_path, {".gitignore": "/train.jsonl\n", "train.jsonl": "stale", "notes.txt": "mine"})
    (out / "sub").mkdir()
    (out / "sub" / "kept.txt").write_text("kept")
    with atomic_dir(out, carry_over=lambda name: name != "train.jsonl") as work:
        (work / "train.jsonl").write_text("fresh")
        (work / "notes.txt").write_text("written by the stage")  # an entry the new output has wins
    assert sorted(p.name for p in out.iterdir()) == [".gitignore", "notes.txt", "sub", "train.jsonl"]
    assert (out / ".gitignore").read_text() == "/train.jsonl\n" and (out / "sub" / "kept.txt").read_text() == "kept"
    assert (out / "train.jsonl").read_text() == "fresh" and (out / "notes.txt").read_text() == "written by the stage"


def test_atomic_dir_refuses_a_file_at_the_output_path_before_the_work(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(NotADirectoryError, match="remove it"):
        with atomic_dir(tmp_path / "out"):
            raise AssertionError("the block must not run")
    assert (tmp_path / "out").read_text() == "a file"


def test_output_path_problems_names_each_option_that_cannot_be_written(tmp_path):
    """What stage_main checks before a stage writes anything: every problem at once, by option."""
    folder, file = tmp_path / "folder", tmp_path / "file.json"
    folder.mkdir()
    file.write_text("{}")
    files = {"--report": folder, "--plot": file / "plot.csv", "--timings": None, "--examples": tmp_path / "new.jsonl"}
    folders = {"--out": file, "--log-folder": tmp_path / "new" / "logs", "--metrics": tmp_path / "new.jsonl"}
    assert output_path_problems(files, folders) == [
        f"--report {folder} is a directory; give the path of a file to write",
        f"--plot {file / 'plot.csv'}: {file} is a file, not a folder; give a path in a folder",
        f"--out {file} is a file; give the path of a folder to write",
        f"--metrics and --examples are the same path {tmp_path / 'new.jsonl'}; give each output its own",
    ]
    assert output_path_problems({"--out": file, "--report": tmp_path / "r.json"}, {"--data": folder}) == []

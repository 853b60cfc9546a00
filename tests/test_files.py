"""File helpers: atomic directory swaps, and reports split into tracked metrics and wall-clock figures."""

import json

import pytest
import yaml

from conftest import REPO
from expqa.files import is_wall_clock, replace_dir, split_wall_clock


def test_split_wall_clock_moves_timings_at_every_depth():
    report = {"passed": True, "seconds": 39.7, "types": {"f16": {"bytes": 10, "write_seconds": 3.0}},
              "train_runtime": 5.0, "train_samples_per_second": 1.0, "total_flos": 1e12, "eval": {"loss": 2.0}}
    kept, clock = split_wall_clock(report)
    assert kept == {"passed": True, "types": {"f16": {"bytes": 10}}, "eval": {"loss": 2.0}}
    assert clock == {"seconds": 39.7, "types": {"f16": {"write_seconds": 3.0}}, "train_runtime": 5.0,
                     "train_samples_per_second": 1.0, "total_flos": 1e12}
    assert not is_wall_clock("eval_loss") and is_wall_clock("real_tokens_per_second")


def test_tracked_metrics_hold_no_wall_clock_values():
    """Every metrics file dvc.yaml declares, as committed: nothing that differs between two runs of the same inputs
    (a fresh clone's `make repro` leaves git clean, and `dvc metrics diff` lists only real changes)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    files = [next(iter(entry)) if isinstance(entry, dict) else entry
             for stage in stages.values() for entry in stage.get("metrics", [])]
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


def test_replace_dir_swaps_and_keeps_the_old_output_on_failure(tmp_path):
    out, new = tmp_path / "out", tmp_path / ".out-new"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_dir(new, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"] and not new.exists()
    with pytest.raises(FileNotFoundError):
        replace_dir(tmp_path / "missing", out)
    assert [p.name for p in out.iterdir()] == ["new.txt"]

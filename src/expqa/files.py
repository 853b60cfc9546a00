"""Small file helpers shared by the stages: content hashes, all-or-nothing directory outputs, and reports split into
what DVC tracks (the same whenever a run is reproduced) and wall-clock figures (logs/, untracked)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def replace_dir(finished: Path, out_dir: Path) -> None:
    """Put a fully written directory (a sibling of out_dir, so renames are atomic) in place of out_dir.

    The old out_dir is renamed aside and deleted only after the new one is in place: a failure at any point
    leaves either the old or the new output, never neither.
    """
    if not out_dir.exists():
        finished.rename(out_dir)
        return
    if not out_dir.is_dir():
        raise NotADirectoryError(f"output path {out_dir} exists and is not a directory")
    previous = out_dir.with_name(f".{out_dir.name}.previous-{os.getpid()}")
    shutil.rmtree(previous, ignore_errors=True)  # left behind by a crashed run
    out_dir.rename(previous)
    try:
        finished.rename(out_dir)
    except BaseException:
        previous.rename(out_dir)
        raise
    shutil.rmtree(previous, ignore_errors=True)


WALL_CLOCK_WORDS = ("seconds", "runtime", "per_second", "total_flos")


def is_wall_clock(key: str) -> bool:
    """Timings, throughput and FLOP counts: they change from run to run (or say nothing a person compares), so in a
    DVC-tracked metrics file they would make `dvc metrics diff` and dvc.lock differ for a reproduced run."""
    return any(word in key for word in WALL_CLOCK_WORDS)


def split_wall_clock(report: dict) -> tuple[dict, dict]:
    """(report without wall-clock keys, those keys), nested dicts split alike."""
    kept, clock = {}, {}
    for key, value in report.items():
        if isinstance(value, dict):
            kept[key], inner = split_wall_clock(value)
            if inner:
                clock[key] = inner
        elif is_wall_clock(key):
            clock[key] = value
        else:
            kept[key] = value
    return kept, clock


def write_json(path: Path, data: dict) -> None:
    """Sorted keys and a final newline, so a reproduced report is the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

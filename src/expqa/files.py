"""Small file helpers shared by the stages: content hashes, all-or-nothing directory outputs, and reports split into
what DVC tracks (the same whenever a run is reproduced) and wall-clock figures (logs/: cached by DVC, not compared)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_dir(out_dir: Path, *, carry_over: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Write a directory output all or nothing: yield an empty work folder that replaces out_dir when the block ends.

    The work folder is a sibling of out_dir (same filesystem, so the swap is a rename) made with the umask's
    permissions, not tempfile.mkdtemp's 0700: it becomes the output that other users and tools read. If the block
    raises, the work folder is removed and out_dir is left as it was. The previous out_dir is renamed aside and
    deleted only once the new one is in place, so a failure at any point leaves the old output or the new one.
    carry_over(name) picks entries of the previous out_dir that the new one keeps unless it has its own (e.g. the
    .gitignore DVC writes into an output folder it tracks).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(
            f"output path {out_dir} exists and is not a directory: remove it, or choose another output path"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = _make_work_dir(out_dir)
    try:
        yield work_dir
        if carry_over is not None and out_dir.is_dir():
            _carry_over_entries(out_dir, work_dir, carry_over)
        _swap_into_place(work_dir, out_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)  # already gone after a successful swap


def _make_work_dir(out_dir: Path) -> Path:
    """A new empty `.<name>-<pid>-<random>` folder next to out_dir; os.mkdir applies the umask."""
    while True:
        work_dir = out_dir.with_name(f".{out_dir.name}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            work_dir.mkdir()
            return work_dir
        except FileExistsError:
            continue


def _carry_over_entries(out_dir: Path, work_dir: Path, carry_over: Callable[[str], bool]) -> None:
    for entry in out_dir.iterdir():
        if not carry_over(entry.name) or (work_dir / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, work_dir / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, work_dir / entry.name, follow_symlinks=False)


def _swap_into_place(finished: Path, out_dir: Path) -> None:
    """Rename finished to out_dir; an existing out_dir is renamed aside first and put back if that fails."""
    if not out_dir.exists():
        finished.rename(out_dir)
        return
    previous = out_dir.with_name(f".{out_dir.name}.previous-{os.getpid()}")
    shutil.rmtree(previous, ignore_errors=True)  # left behind by a crashed run
    out_dir.rename(previous)
    try:
        finished.rename(out_dir)
    except BaseException:
        previous.rename(out_dir)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def output_path_problems(files: Mapping[str, Path | None], folders: Mapping[str, Path | None]) -> list[str]:
    """What would stop a stage from writing its outputs, found before it writes any (a failure after the first
    output is written would leave it replaced and the others stale): a file output that is a folder, a folder output
    that is a file, a path under a file, two outputs on one path. Keys are the options (--report); None is skipped."""
    problems: list[str] = []
    seen: dict[Path, str] = {}
    for kind, paths in (("file", files), ("folder", folders)):
        for option, path in paths.items():
            if path is None:
                continue
            path = Path(path)
            blocker = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
            if kind == "file" and path.is_dir():
                problems.append(f"{option} {path} is a directory; give the path of a file to write")
            elif kind == "folder" and path.exists() and not path.is_dir():
                problems.append(f"{option} {path} is a file; give the path of a folder to write")
            elif blocker is not None:
                problems.append(f"{option} {path}: {blocker} is a file, not a folder; give a path in a folder")
            first = seen.setdefault(path.resolve(), option)
            if first != option:
                problems.append(f"{option} and {first} are the same path {path}; give each output its own")
    return problems


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

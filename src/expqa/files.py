"""Small file helpers shared by the stages: content hashes and all-or-nothing directory outputs."""

from __future__ import annotations

import hashlib
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

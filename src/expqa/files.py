"""Small file helpers shared by the stages: content hashes and all-or-nothing directory outputs."""

from __future__ import annotations

import hashlib
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
    """Put a fully written temporary directory in place of out_dir (a failure before this leaves out_dir as it was)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    finished.rename(out_dir)

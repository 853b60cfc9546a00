"""The checkout the user commands (`expqa params`, `verify`, `pull`) work in."""

from __future__ import annotations

from pathlib import Path


def find_project(start: Path | None = None) -> Path:
    """The checkout root: the nearest folder (upwards) with dvc.yaml and params.yaml."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists() and (folder / "params.yaml").exists():
            return folder
    raise SystemExit(
        "error: not inside an expqa checkout (no dvc.yaml + params.yaml here or above); cd into the repository first"
    )

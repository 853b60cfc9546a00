"""Progress bars (tqdm) for the stage loops that run longer than a few seconds, drawn only on a terminal.

A bar is drawn when stderr is a terminal (`dvc repro` run by hand shows counts, rate and ETA); when stderr is a
file or a pipe (CI logs, `make repro > log`) the loops run bare, so logs hold no carriage-return redraws.
EXPQA_PROGRESS=1 draws bars anyway (e.g. into a log you follow with `tail -f`), EXPQA_PROGRESS=0 never does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

ENV_VAR = "EXPQA_PROGRESS"
T = TypeVar("T")


def enabled() -> bool:
    """Whether bars are drawn: EXPQA_PROGRESS=1 / 0 if set, else whether stderr is a terminal."""
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(
            f"{ENV_VAR}={forced!r}: use 1 (progress bars always), 0 (never) or leave it unset "
            "(bars when stderr is a terminal)"
        )
    return sys.stderr.isatty()


def progress(
    iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it", position: int | None = None
) -> Iterable[T]:
    """`iterable` wrapped in a tqdm bar (count, rate, ETA) when bars are enabled, else `iterable` itself.

    total: for iterables without len() (generators); position: the line of this bar when several processes draw
    at once (evaluate's base and tuned side by side).
    """
    if not enabled():
        return iterable
    return tqdm(iterable, desc=desc, total=total, unit=unit, position=position, dynamic_ncols=True)


def byte_progress(total: int | None, *, desc: str) -> tqdm:
    """A bar advanced by hand with `.update(bytes)`, for a stream whose row count is unknown until it is read
    (total None: no ETA, bytes and rate only). A disabled tqdm when bars are off: update() does nothing."""
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True, disable=not enabled()
    )

"""How counts read in the lines users see: "1 near-tie flip", "2 near-tie flips", never "1 near-tie flips"."""

from __future__ import annotations


def plural(count: int, noun: str, plural_noun: str | None = None) -> str:
    """`count` and its noun, in the plural unless the count is 1: plural(2, "process", "processes"). Thousands are
    separated ("12,345 rows"); `plural_noun` defaults to the noun with an "s"."""
    return f"{count:,} {noun if count == 1 else plural_noun or noun + 's'}"

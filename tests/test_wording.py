"""Counts read as words: the noun agrees with the number (expqa.wording)."""

import pytest

from expqa.wording import plural


@pytest.mark.parametrize(
    "count,noun,plural_noun,expected",
    [
        (0, "near-tie flip", None, "0 near-tie flips"),
        (1, "near-tie flip", None, "1 near-tie flip"),
        (2, "step", None, "2 steps"),
        (1, "process", "processes", "1 process"),
        (4, "process", "processes", "4 processes"),
        (12345, "row", None, "12,345 rows"),
        (-1, "token", None, "-1 tokens"),
    ],
)
def test_the_noun_agrees_with_the_count(count, noun, plural_noun, expected):
    assert plural(count, noun, plural_noun) == expected

"""Small helpers for the words exigo prints and draws."""

from __future__ import annotations

__all__ = ["ordinal"]


def ordinal(number: int) -> str:
    """English ordinal: 1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, 22nd, 102nd.

    Args:
        number: a non-negative integer.

    Returns:
        The number followed by its suffix.
    """
    if number % 100 in (11, 12, 13):
        return f"{number}th"
    return f"{number}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(number % 10, 'th') }"

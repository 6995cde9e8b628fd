"""Average ranks (ties share the mean of their ranks), for the analyses that rank.

`exigo.analyses.sanity`'s Spearman correlations and `exigo.analyses.label_votes`' vote order
use it instead of `scipy.stats.rankdata`, whose import costs the run's process a second.
"""

from __future__ import annotations

import numpy as np

__all__ = ["average_ranks"]


def average_ranks(rows: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """1-based ranks of each row's kept values, tied values sharing the mean of their ranks.

    What `scipy.stats.rankdata(..., axis=1, method="average")` gives for the kept values
    alone; written out because importing `scipy.stats` takes 1 CPU-second (measured on the
    2-core machine), which the analyses' thread spent holding the interpreter lock against
    the training beside it. Values are sorted once per row; a tie block [s, e] (0-based
    positions in sorted order) gets rank (s + e) / 2 + 1.

    Args:
        rows: float array [N, D], not NaN where kept (-inf and inf are ranked like any value).
        kept: bool array [N, D]; the other positions are left out (their rank is undefined).

    Returns:
        Float array [N, D]: the ranks among each row's kept values (arbitrary where not kept).
    """
    if rows.shape[1] == 0:
        return np.empty(rows.shape)
    positions = np.arange(rows.shape[1])
    values = np.where(kept, rows, np.nan)  # left out: sorted after every kept value, inf too
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    starts = np.ones(ordered.shape, bool)  # where a block of equal values begins
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = np.ones(ordered.shape, bool)  # where one ends
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, positions, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, positions, positions[-1])[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty(rows.shape)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=1)
    return ranks

"""Colour limits shared by the figures that draw gradient maps (saliency, errors, class models)."""

from __future__ import annotations

import numpy as np
from torch import Tensor

__all__ = ["ROBUST_QUANTILE", "colour_limit"]

#: Colour scales end at this quantile of the magnitudes, so a few hot pixels do not wash out
#: everything else (draw the colour bar with `extend=...` to mark the clipped ends).
ROBUST_QUANTILE = 0.995


def colour_limit(*maps: Tensor, quantile: float = ROBUST_QUANTILE) -> float:
    """Upper colour limit for magnitudes (symmetric limit ±L for signed maps).

    Args:
        maps: float tensors of any shape and device.
        quantile: which quantile of all their absolute values to take.

    Returns:
        The quantile; the maximum if the quantile is 0; 1.0 if every value is 0 (never 0,
        so matplotlib's normalisation stays defined).
    """
    magnitudes = np.concatenate(
        [m.detach().abs().flatten().float().cpu().numpy() for m in maps] or [np.zeros(0)]
    )
    if magnitudes.size == 0:
        return 1.0
    limit = float(np.quantile(magnitudes, quantile))
    if limit <= 0:  # a map that is zero almost everywhere
        limit = float(magnitudes.max())
    return limit if limit > 0 else 1.0

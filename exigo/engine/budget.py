r"""The analyses' budget: their model passes per epoch against the epoch's training.

An epoch's training makes one forward-backward pass per training image; each analysis
declares its own passes per epoch in the same unit (`exigo.analysis.Analysis.cost`). With
$T$ training passes, budget $b$ (`--analysis-budget`) and $A$ the analyses' passes:

- $A \le bT + F$: every analysis runs after every epoch with its default settings, where
  $F$ = `FREE_PIXEL_PASSES` / (pixels of one image) is an allowance every run has (about
  51,000 passes of a 28x28 image, 260 of a 3x224x224 one): a small run's analyses take
  seconds whatever their ratio to its training, and are never lowered;
- otherwise every analysis that runs the model gets `scale` $s = \max((bT + F) / A, 1/4)$ (it
  lowers its own settings: fewer path steps, samples, ascent steps, coarser occlusion), and if
  the lowered passes $A_s$ still exceed $bT + F$ they run every
  $k = \lceil A_s / (bT + F) \rceil$ epochs (and after the last one).

`plan_budget` returns the one line the pipeline prints when it chose either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from exigo._text import ordinal
from exigo.analysis import Analysis, CostShape

__all__ = ["FREE_PIXEL_PASSES", "MIN_SCALE", "plan_budget"]

#: The least share of its default settings an analysis is lowered to; beyond, it runs less often.
MIN_SCALE = 0.25

#: Passes every run's analyses may make, in image pixels x passes (a few CPU-seconds at most).
FREE_PIXEL_PASSES = 4e7


def plan_budget(
    analyses: Sequence[Analysis],
    shape: CostShape,
    training_passes: int,
    budget: float,
    *,
    free_pixel_passes: float = FREE_PIXEL_PASSES,
) -> str | None:
    """Set each analysis' `scale` and `every` so one epoch's analyses fit the budget.

    Args:
        analyses: the run's analyses (their `scale` and `every` are reset, then set).
        shape: probe size, classes and image shape.
        training_passes: T, training images per epoch (this process' share).
        budget: b; 0 leaves every analysis at full settings, every epoch.
        free_pixel_passes: the allowance F every run has, in pixels x passes.

    Returns:
        One line saying what was lowered and how often the analyses run; None when the
        analyses fit (or `budget` is 0).
    """
    for analysis in analyses:
        analysis.scale, analysis.every = 1.0, 1
    full = {analysis.name: analysis.cost(shape) for analysis in analyses}
    free = free_pixel_passes / math.prod(shape.image_shape)
    total, allowed = sum(full.values()), budget * max(training_passes, 1) + free
    if budget == 0 or total <= allowed:
        return None
    costly = [analysis for analysis in analyses if full[analysis.name] > 0]
    scale = max(MIN_SCALE, allowed / total)
    for analysis in costly:
        analysis.scale = scale
    lowered = {analysis.name: analysis.cost(shape) for analysis in costly}
    every = math.ceil(sum(lowered.values()) / allowed)
    if every > 1:
        for analysis in costly:
            analysis.every = every
    passes = ", ".join(
        f"{name} {full[name]:,.0f} -> {lowered[name]:,.0f}" for name in sorted(lowered)
    )
    when = (
        f"; still over, so they run after every {ordinal(every)} epoch and after the last"
        if every > 1
        else ""
    )
    return (
        f"analysis budget: the analyses would make {total:,.0f} model passes per epoch, "
        f"{total / max(training_passes, 1):.1f}x the epoch's {training_passes:,} training "
        f"passes (--analysis-budget {budget:g}); settings lowered to {scale:.0%} "
        f"(passes per epoch: {passes}){when}"
    )

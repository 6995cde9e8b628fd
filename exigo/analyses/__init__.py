"""The analyses a run performs by default, in the order they are called after each epoch.

Adding an analysis to exigo means writing its module (compute functions, a draw function and a
small hook class with `name` and `__call__(ctx)`) and adding one line here.
"""

from __future__ import annotations

from exigo.analyses import (
    attributions,
    class_models,
    confusion,
    errors,
    examples,
    faithfulness,
    label_votes,
    projection,
    saliency,
    sanity,
)
from exigo.analyses.attributions import AttributionAnalysis
from exigo.analyses.class_models import ClassModelAnalysis
from exigo.analyses.confusion import ConfusionAnalysis
from exigo.analyses.errors import ErrorAnalysis
from exigo.analyses.examples import ExampleAnalysis
from exigo.analyses.projection import ProjectionAnalysis
from exigo.analyses.saliency import SaliencyAnalysis
from exigo.analysis import Analysis
from exigo.config import Config

__all__ = [
    "attributions",
    "class_models",
    "confusion",
    "default_analyses",
    "errors",
    "examples",
    "faithfulness",
    "label_votes",
    "projection",
    "saliency",
    "sanity",
]


def default_analyses(config: Config) -> list[Analysis]:
    """The per-epoch analyses for `config`, in call order.

    Args:
        config: the run's settings; `confusion_normalize`, `seed`, `attribution_checks`,
            `projection_limit` (0 leaves the projection out), `rescore_fraction`,
            `rescore_every_epoch`, `eval_batch_size` and `epochs` choose and configure the
            analyses.

    Returns:
        The t-SNE projection (when enabled) first: its t-SNE runs in the figure helper
        process while the others compute. Then the confusion matrix, saliency maps, class
        models, explained errors, the examples' training dynamics and suspected label errors,
        and the attributions (when enabled).
    """
    analyses: list[Analysis] = []
    if config.projection_limit > 0:
        analyses.append(ProjectionAnalysis(limit=config.projection_limit, seed=config.seed))
    analyses.append(ConfusionAnalysis(normalize=config.confusion_normalize))
    analyses.append(SaliencyAnalysis())
    analyses.append(ClassModelAnalysis(seed=config.seed))
    analyses.append(ErrorAnalysis())
    analyses.append(
        ExampleAnalysis(
            final_epoch=config.epochs,
            seed=config.seed,
            rescore_fraction=config.rescore_fraction,
            batch_size=config.eval_batch_size,
            rescore_every_epoch=config.rescore_every_epoch,
        )
    )
    if config.attribution_checks:
        analyses.append(AttributionAnalysis(seed=config.seed))
    return analyses

r"""The errors, explained: the most frequent confusions and what pulled each image both ways.

A confusion matrix says which classes are confused; this analysis shows why. From the
evaluation pass (no extra pass over the data) it takes the most frequent (true, predicted)
pairs among the misclassified images and, for up to five images of each pair (the most
confident mistakes first), draws the image and two signed saliency maps (Simonyan, Vedaldi &
Zisserman 2013, arXiv:1312.6034, §3):

$$ \nabla_x f_y(x) \quad \text{(towards the true class } y\text{)}, \qquad
   \nabla_x f_{\hat y}(x) \quad \text{(towards the predicted class } \hat y\text{)} $$

on one shared colour scale, with $p(y \mid x)$ and $p(\hat y \mid x)$ from the evaluation pass.
Red pixels raise that class's logit, blue pixels lower it: where the predicted-class map is
red on ink that the true-class map leaves white or blue, that stroke is what misled the
network. The gradients come from `exigo.analyses.saliency.input_gradients`, one batched call
for both maps of every image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from exigo.analyses.saliency import input_gradients, reduce_channels
from exigo.analysis import Analysis, CostShape, EpochContext, FigureInfo
from exigo.data import display_pixels, gather
from exigo.figures.colour_scale import ROBUST_QUANTILE, colour_limit
from exigo.figures.tiles import (
    TileBlock,
    TileRow,
    display_tiles,
    object_outline,
    tile_figure,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


__all__ = [
    "Confusion",
    "ErrorAnalysis",
    "ErrorSaliency",
    "error_saliency",
    "frequent_confusions",
    "plot_errors",
]


@dataclass(frozen=True)
class Confusion:
    """One (true, predicted) pair of classes and some of its misclassified images.

    Attributes:
        true: the images' true class.
        predicted: the class the model predicted instead.
        count: how many images of the evaluation set have this pair.
        indices: int64 tensor [k], k <= the number asked for: positions of some of those
            images in the evaluation set, the most confident mistakes first.
    """

    true: int
    predicted: int
    count: int
    indices: Tensor


def frequent_confusions(
    targets: Tensor,
    predictions: Tensor,
    probabilities: Tensor | None = None,
    *,
    pairs: int = 3,
    per_pair: int = 5,
) -> list[Confusion]:
    """The most frequent (true, predicted) confusions, with example images of each.

    Pairs are ordered by count, most frequent first; equal counts by true, then predicted
    class. Within a pair, images are ordered by the probability of the wrong class, highest
    first (the most confident mistakes), or by position when `probabilities` is None.

    Args:
        targets: int64 tensor [N], true classes.
        predictions: int64 tensor [N], predicted classes.
        probabilities: float tensor [N, C] of class probabilities, or None.
        pairs: at most this many pairs.
        per_pair: at most this many images per pair.

    Returns:
        Up to `pairs` `Confusion`s; empty when every prediction is right.
    """
    targets, predictions = targets.cpu().long(), predictions.cpu().long()
    wrong = torch.nonzero(targets != predictions).flatten()
    if wrong.numel() == 0 or pairs < 1:
        return []
    classes = int(max(targets.max(), predictions.max())) + 1
    if probabilities is not None:
        classes = max(classes, probabilities.shape[1])
    pair_ids = targets[wrong] * classes + predictions[wrong]
    counts = torch.bincount(pair_ids, minlength=classes * classes)
    present = torch.nonzero(counts).flatten()
    # stable sort of the (ascending) pair ids by count: ties stay in (true, predicted) order
    order = torch.sort(counts[present], descending=True, stable=True).indices
    result = []
    for pair_id in present[order[:pairs]].tolist():
        true, predicted = divmod(pair_id, classes)
        members = wrong[pair_ids == pair_id]  # ascending positions
        if probabilities is not None:
            confidence = probabilities.cpu()[members, predicted]
            members = members[torch.sort(confidence, descending=True, stable=True).indices]
        result.append(Confusion(true, predicted, int(counts[pair_id]), members[:per_pair].clone()))
    return result


@dataclass(frozen=True)
class ErrorSaliency:
    r"""Signed input gradients of a batch towards two classes, channels reduced.

    Attributes:
        towards_true: float tensor [N, H, W], $\nabla_x f_y(x)$.
        towards_predicted: float tensor [N, H, W], $\nabla_x f_{\hat y}(x)$.
    """

    towards_true: Tensor
    towards_predicted: Tensor


def error_saliency(
    model: nn.Module, images: Tensor, true: Tensor, predicted: Tensor
) -> ErrorSaliency:
    """Saliency of each image towards its true and its predicted class, signed.

    One batched `input_gradients` call for both maps; the model comes back unchanged (see
    `exigo._modes.frozen`) and `images` are not modified. Multi-channel gradients keep, at every
    pixel, the channel of largest magnitude (`reduce_channels`).

    Args:
        model: classifier mapping [N, C, H, W] to logits.
        images: float tensor [N, C, H, W], as the model takes them, on the model's device.
        true: int64 tensor [N], true classes.
        predicted: int64 tensor [N], predicted classes.

    Returns:
        `ErrorSaliency` on the images' device.
    """
    count = images.shape[0]
    both = input_gradients(
        model, torch.cat([images, images]), torch.cat([true, predicted]).to(images.device)
    )
    maps = reduce_channels(both)  # (2N, H, W)
    return ErrorSaliency(towards_true=maps[:count], towards_predicted=maps[count:])


def plot_errors(
    confusions: Sequence[Confusion],
    pixels: Tensor,
    saliency: ErrorSaliency,
    true_probabilities: Tensor,
    predicted_probabilities: Tensor,
    class_names: Sequence[str],
    *,
    title: str | None = None,
) -> Figure:
    """Per confusion, three rows: the images, saliency towards the true and the predicted class.

    The images of all confusions are concatenated in order (the first `len(confusions[0].
    indices)` belong to the first confusion, and so on). Both saliency rows of every block use
    one diverging colour scale centred at 0, shared by the whole figure. Images are shown as
    they are (grey or colour); a grey line marks the object's outline only where that is
    meaningful (`exigo.figures.tiles.object_outline`: one channel, dark background). Column
    captions read `p(true)` and `p(pred)` (the class names are in the header and row labels,
    so long names cannot run into the next column). Drawn as one picture per confusion
    (`exigo.figures.tiles`).

    Args:
        confusions: the pairs to draw (at least one), with their images' indices.
        pixels: float tensor [N, C, H, W] in [0, 1], the images for display.
        saliency: their `ErrorSaliency`.
        true_probabilities: float tensor [N], probability of the true class.
        predicted_probabilities: float tensor [N], probability of the predicted class.
        class_names: display name per class.
        title: figure title.

    Returns:
        A matplotlib `Figure` (not attached to pyplot).

    Raises:
        ValueError: no confusion to draw.
    """
    pixels = pixels.detach().float().cpu()
    towards_true = saliency.towards_true.detach().float().cpu().numpy()
    towards_predicted = saliency.towards_predicted.detach().float().cpu().numpy()
    limit = colour_limit(saliency.towards_true, saliency.towards_predicted)
    tiles = display_tiles(pixels.numpy())  # grey [N, H, W] or RGB [N, H, W, 3]
    ink = object_outline(pixels.numpy())  # (N, H, W) or None
    if not confusions:
        raise ValueError("plot_errors needs at least one confusion")
    blocks, start = [], 0
    for confusion in confusions:
        stop = start + confusion.indices.numel()
        true_name = class_names[confusion.true]
        predicted_name = class_names[confusion.predicted]
        maps = {"cmap": "RdBu_r", "limits": (-limit, limit), "bar": True, "clipped": (True, True)}
        rows = [
            TileRow("image", tiles[start:stop]),
            TileRow(
                f"saliency\ntowards {true_name}\n(true)",
                towards_true[start:stop],
                outline=None if ink is None else ink[start:stop],
                **maps,
            ),
            TileRow(
                f"saliency\ntowards {predicted_name}\n(predicted)",
                towards_predicted[start:stop],
                outline=None if ink is None else ink[start:stop],
                **maps,
            ),
        ]
        header = (
            f"true {true_name} predicted as {predicted_name}: {confusion.count} "
            f"image{'s' if confusion.count != 1 else ''}"
            + (
                f", {confusion.indices.numel()} shown"
                if confusion.count > confusion.indices.numel()
                else ""
            )
        )
        labels = [
            f"p(true) {float(true_probabilities[index]):.2f}\n"
            f"p(pred) {float(predicted_probabilities[index]):.2f}"
            for index in range(start, stop)
        ]
        blocks.append(TileBlock(rows, column_labels=labels, header=header))
        start = stop
    notes = [
        "Saliency (∂ logit / ∂ pixel): red raises that class's logit, blue lowers it"
        + ("; grey line: the object's outline (intensity 0.5)." if ink is not None else ".")
        + " p(true), p(pred): probability of the true and of the predicted class."
    ]
    if pixels.shape[1] > 1:
        notes.append(
            f"Maps: at every pixel, the signed gradient of the channel of largest |gradient| "
            f"of the {pixels.shape[1]}."
        )
    notes.append(
        f"One colour scale for every map, clipped at the {100 * ROBUST_QUANTILE:g}th "
        "percentile. The most confident mistakes first."
    )
    return tile_figure(blocks, title or "Most frequent errors", "\n".join(notes))


class ErrorAnalysis(Analysis):
    """Per-epoch hook: `plots/errors_{epoch}.png` for the most frequent confusions.

    Reads the evaluation pass; only the (at most `pairs * per_pair`) shown images go through
    the model again, for their gradients. With no error at all it writes no figure and logs
    one line.

    Args:
        pairs: how many (true, predicted) pairs to show.
        per_pair: how many images per pair.
    """

    name = "errors"
    figures = (
        FigureInfo(
            "errors",
            "Errors",
            "Held-out images the network gets wrong, with its prediction and the true label.",
        ),
    )

    def __init__(self, pairs: int = 3, per_pair: int = 5) -> None:
        self.pairs = pairs
        self.per_pair = per_pair

    def cost(self, shape: CostShape) -> float:
        r"""At most two gradients (towards the true and the predicted class) per shown image.

        Args:
            shape: probe size, classes and image shape.

        Returns:
            $2 \cdot$ pairs $\cdot$ per_pair passes per epoch (an upper bound; its settings
            do not scale).
        """
        return 2 * self.pairs * self.per_pair

    def __call__(self, ctx: EpochContext) -> None:
        """Select the confusions, compute their saliency and save the figure."""
        evaluation = ctx.eval
        if evaluation is None:
            return
        confusions = frequent_confusions(
            evaluation.targets,
            evaluation.predictions,
            evaluation.probabilities,
            pairs=self.pairs,
            per_pair=self.per_pair,
        )
        if not confusions:
            ctx.log(f"errors: every held-out image is classified correctly at epoch {ctx.epoch}")
            return
        indices = torch.cat([confusion.indices for confusion in confusions])
        images, _ = gather(ctx.val_data, indices)
        true = torch.cat([torch.full_like(c.indices, c.true) for c in confusions])
        predicted = torch.cat([torch.full_like(c.indices, c.predicted) for c in confusions])
        saliency = error_saliency(ctx.model, images.to(ctx.device), true, predicted)
        ctx.draw_figure(
            "errors",
            plot_errors,
            confusions,
            display_pixels(images, ctx.normalization),
            saliency,
            evaluation.probabilities[indices, true],
            evaluation.probabilities[indices, predicted],
            ctx.class_names,
            title=f"Most frequent errors {ctx.when}: what pulled each image both ways",
        )

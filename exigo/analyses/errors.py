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
from typing import TYPE_CHECKING, Any

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
    "SaliencyPairs",
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


@dataclass(frozen=True)
class SaliencyPairs:
    """Images with their saliency towards two classes: the errors and label-issues figures' rows.

    The image row, then a map towards each class on one shared colour scale clipped at the
    `ROBUST_QUANTILE`, with the object's outline over the maps where it is one.

    Attributes:
        tiles: the images as tiles, grey [N, H, W] or RGB [N, H, W, 3].
        first: float array [N, H, W], the maps towards the first class (the true or given).
        second: float array [N, H, W], the maps towards the second (the predicted or rival).
        limit: the colour scale's end, ± on both rows.
        ink: float array [N, H, W] to outline, or None (`object_outline`).
        channels: C of the images.
    """

    tiles: Any
    first: Any
    second: Any
    limit: float
    ink: Any
    channels: int

    @classmethod
    def of(cls, pixels: Tensor, saliency: ErrorSaliency) -> SaliencyPairs:
        """Colour and scale the maps of `pixels`.

        Args:
            pixels: float tensor [N, C, H, W] in [0, 1], the images for display.
            saliency: their `ErrorSaliency` (towards the true or given class, and the other).

        Returns:
            The `SaliencyPairs`.
        """
        seen = pixels.detach().float().cpu().numpy()
        return cls(
            tiles=display_tiles(seen),
            first=saliency.towards_true.detach().float().cpu().numpy(),
            second=saliency.towards_predicted.detach().float().cpu().numpy(),
            limit=colour_limit(saliency.towards_true, saliency.towards_predicted),
            ink=object_outline(seen),
            channels=seen.shape[1],
        )

    def rows(self, start: int, stop: int, first_label: str, second_label: str) -> list[TileRow]:
        """The image row and the two map rows of images `start` to `stop`.

        Args:
            start: first image (index into the N).
            stop: one past the last.
            first_label: the first map row's title.
            second_label: the second's.

        Returns:
            Three `TileRow`s.
        """
        maps = {
            "cmap": "RdBu_r",
            "limits": (-self.limit, self.limit),
            "bar": True,
            "clipped": (True, True),
            "outline": None if self.ink is None else self.ink[start:stop],
        }
        return [
            TileRow("image", self.tiles[start:stop]),
            TileRow(first_label, self.first[start:stop], **maps),
            TileRow(second_label, self.second[start:stop], **maps),
        ]

    @property
    def outline_clause(self) -> str:
        """The footnote's end of sentence: the outline where there is one, else a full stop."""
        return "; grey line: the object's outline (intensity 0.5)." if self.ink is not None else "."

    @property
    def channels_note(self) -> str:
        """How colour maps were made from the channels ("" for one channel)."""
        if self.channels == 1:
            return ""
        return (
            "Maps: at every pixel, the signed gradient of the channel of largest |gradient| "
            f"of the {self.channels}."
        )


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
    if not confusions:
        raise ValueError("plot_errors needs at least one confusion")
    pairs = SaliencyPairs.of(pixels, saliency)
    blocks, start = [], 0
    for confusion in confusions:
        stop = start + confusion.indices.numel()
        true_name = class_names[confusion.true]
        predicted_name = class_names[confusion.predicted]
        rows = pairs.rows(
            start,
            stop,
            f"saliency\ntowards {true_name}\n(true)",
            f"saliency\ntowards {predicted_name}\n(predicted)",
        )
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
        + pairs.outline_clause
        + " p(true), p(pred): probability of the true and of the predicted class."
    ]
    if pairs.channels_note:
        notes.append(pairs.channels_note)
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

r"""Confusion matrix of the evaluation pass, with per-class precision and recall.

The confusion matrix $M \in \mathbb{N}^{C \times C}$ counts the held-out samples by true class
(row $i$) and predicted class (column $j$):

$$M_{ij} = \left| \lbrace n : y_n = i,\ \hat y_n = j \rbrace \right|.$$

Its diagonal holds the correct predictions. Per class $c$,

$$\mathrm{precision}_c = \frac{M_{cc}}{\sum_i M_{ic}}, \qquad
\mathrm{recall}_c = \frac{M_{cc}}{\sum_j M_{cj}}, \qquad
\mathrm{accuracy} = \frac{\operatorname{tr} M}{\sum_{ij} M_{ij}},$$

with $0/0 := 0$ (a class never predicted has precision 0; a class absent from the targets has
recall 0). The row-normalised matrix $M_{ij} / \sum_k M_{ik}$ has rows summing to 1 and recall
on its diagonal. Definitions as in Fawcett, "An introduction to ROC analysis", Pattern
Recognition Letters 27 (2006); the figure layout (precision as an extra row, recall as an
extra column, accuracy in the corner) follows MATLAB's `plotconfusion`.

Compute (`confusion_matrix`, `precision_recall`, `row_normalize`) is pure tensor code that runs
on any device; `plot_confusion` draws; `ConfusionAnalysis` is the per-epoch hook that reads the
pipeline's single evaluation pass (no extra pass over the data).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from exigo._text import ordinal
from exigo.analysis import Analysis, EpochContext, FigureInfo

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap, Normalize
    from matplotlib.figure import Figure


__all__ = [
    "ConfusionAnalysis",
    "confusion_matrix",
    "plot_confusion",
    "precision_recall",
    "row_normalize",
]

#: Above this many classes the cells carry no text (it could not be read); colours remain, and
#: a panel beside the matrix lists the most frequent confusions with their counts.
MAX_ANNOTATED_CLASSES = 20

#: Confusions listed in that panel.
LISTED_CONFUSIONS = 15

#: Smallest tick label font size; with more classes than fit, every k-th class is labelled.
MIN_TICK_POINTS = 5.0


def confusion_matrix(targets: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """Count samples by true and predicted class.

    One `bincount` over the flat cell index `target * C + prediction`, on the inputs' device.

    Args:
        targets: integer tensor [N], true classes in `[0, num_classes)`.
        predictions: integer tensor [N], predicted classes in `[0, num_classes)`, same device.
        num_classes: C, at least 1.

    Returns:
        int64 tensor [C, C] on the inputs' device; row = true class, column = predicted class.
        Row sums are the class counts of `targets`, column sums those of `predictions`.

    Raises:
        ValueError: shapes differ or are not 1-D, dtypes are not integer, a class is out of
            range, or `num_classes < 1`.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if targets.dim() != 1 or targets.shape != predictions.shape:
        raise ValueError(
            "targets and predictions must be 1-D and of equal length, got "
            f"{tuple(targets.shape)} and {tuple(predictions.shape)}"
        )
    for name, tensor in (("targets", targets), ("predictions", predictions)):
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer class indices, got {tensor.dtype}")
        if tensor.numel() and not 0 <= int(tensor.min()) <= int(tensor.max()) < num_classes:
            raise ValueError(
                f"{name} must lie in [0, {num_classes}), got values in "
                f"[{int(tensor.min())}, {int(tensor.max())}]"
            )
    # int64 before multiplying: uint8 or int32 labels would overflow target * C.
    cells = targets.long() * num_classes + predictions.long()
    counts = torch.bincount(cells, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def _safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """The ratio as float32, 0 where the denominator is 0 (never NaN)."""
    numerator = numerator.to(torch.float32)
    denominator = denominator.to(torch.float32)
    return torch.where(
        denominator > 0, numerator / denominator.clamp_min(1), torch.zeros_like(numerator)
    )


def precision_recall(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class precision and recall of a confusion matrix.

    Args:
        matrix: int tensor [C, C], row = true class, column = predicted class.

    Returns:
        `(precision, recall)`, float32 tensors [C] on the matrix's device. precision_c =
        M[c, c] / column sum c (0 if class c is never predicted); recall_c = M[c, c] / row
        sum c (0 if class c is absent from the targets). Never NaN.
    """
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square [C, C], got {tuple(matrix.shape)}")
    correct = matrix.diagonal()
    return _safe_ratio(correct, matrix.sum(0)), _safe_ratio(correct, matrix.sum(1))


def row_normalize(matrix: Tensor) -> Tensor:
    """Divide each row by its sum: entry (i, j) is the fraction of class i predicted as j.

    Args:
        matrix: int tensor [C, C], row = true class, column = predicted class.

    Returns:
        float32 tensor [C, C] on the matrix's device. Each row of a class present in the
        targets sums to 1 and its diagonal entry is that class's recall; the row of an absent
        class is all zeros (never NaN).
    """
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square [C, C], got {tuple(matrix.shape)}")
    return _safe_ratio(matrix, matrix.sum(1, keepdim=True).expand_as(matrix))


# ----------------------------------------------------------------------------------------- draw


def _truncated(name: str, low: float) -> Colormap:
    """Colormap `name` without its palest part, so the smallest non-zero value stays visible."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    return ListedColormap(colormaps[name](np.linspace(low, 1.0, 256)), name=f"{name}_from_{low}")


def _error_norm(off_diagonal: np.ndarray, normalized: bool) -> Normalize | None:
    """Log scale over the non-zero errors (None when there are none)."""
    from matplotlib.colors import LogNorm

    errors = off_diagonal[off_diagonal > 0]
    if errors.size == 0:
        return None
    low = float(errors.min()) if normalized else 1.0  # counts: start at one error
    high = float(errors.max())
    if high <= low:  # one distinct value: give the scale a decade of room
        high = low * 10
    return LogNorm(vmin=low, vmax=high)


def _log_ticks(norm: Normalize) -> list[float]:
    """1-2-5 ticks within a log norm's range, its ends included."""
    low, high = float(norm.vmin), float(norm.vmax)
    ticks = {low, high}
    for exponent in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        for mantissa in (1, 2, 5):
            tick = mantissa * 10.0**exponent
            if low * 1.15 < tick < high / 1.15:  # not crowding the ends
                ticks.add(tick)
    return sorted(ticks)


def _format_fraction(value: float) -> str:
    """Percent of the row, short enough for a cell: 100, 98.5, 0.4, <0.1, 0."""
    if value == 0:
        return "0"
    if value == 1:
        return "100"
    percent = 100 * value
    if percent < 0.1:
        return "<0.1"
    return f"{min(percent, 99.9):.1f}"


def _top_confusions(counts: np.ndarray, limit: int) -> list[tuple[int, int, int]]:
    """The `limit` largest off-diagonal cells as (true, predicted, count), largest first.

    Equal counts keep (true, predicted) order; empty cells are left out.
    """
    off = counts.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    flat = off.flatten()
    order = np.argsort(-flat, kind="stable")[:limit]
    size = counts.shape[0]
    return [(int(i // size), int(i % size), int(flat[i])) for i in order if flat[i] > 0]


def _shorten(name: str, characters: int) -> str:
    return name if len(name) <= characters else name[: characters - 1] + "…"


def _text_color(rgba: np.ndarray) -> str:
    luminance = 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]
    return "white" if luminance < 0.5 else "black"


def plot_confusion(
    matrix: Tensor,
    class_names: Sequence[str] | None = None,
    *,
    normalize: bool = False,
    title: str = "Confusion matrix",
    annotate: bool | None = None,
) -> Figure:
    """Draw a confusion matrix with precision and recall margins and the accuracy in the title.

    Layout: rows are true classes ("True label"), columns predicted classes ("Predicted
    label"). An extra bottom row holds each predicted class's precision, an extra right column
    each true class's recall, the corner the overall accuracy; "–" marks a ratio whose
    denominator is zero (reported as 0 by `precision_recall`). Correct predictions (diagonal)
    are blue on a linear scale; errors (off-diagonal) are red on their own logarithmic scale,
    so a single confusion stays visible next to a diagonal of thousands; empty cells are white.

    Args:
        matrix: int tensor [C, C] of counts (any device), row = true class.
        class_names: C display names (default "0".."C-1").
        normalize: colour and label the row-normalised matrix (percent of the true class; the
            diagonal is then recall). Precision, recall and accuracy come from the counts.
        title: first line of the title; the accuracy line is appended.
        annotate: write the value in every cell; default: only up to
            `MAX_ANNOTATED_CLASSES` classes, where the text can still be read. Without cell
            text, a panel right of the matrix lists the `LISTED_CONFUSIONS` most frequent
            confusions (true → predicted, count, percent of the true class).

    Returns:
        A matplotlib `Figure` (not attached to pyplot).
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize, PowerNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, PercentFormatter, StrMethodFormatter

    counts = matrix.detach().cpu().to(torch.int64)
    num_classes = counts.shape[0]
    names = [str(c) for c in range(num_classes)] if class_names is None else list(class_names)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a {num_classes}-class matrix")
    precision, recall = (t.numpy() for t in precision_recall(counts))
    predicted = counts.sum(0).numpy()
    support = counts.sum(1).numpy()
    total, correct = int(counts.sum()), int(counts.trace())
    values = (row_normalize(counts) if normalize else counts).numpy().astype(np.float64)

    # Colours: one RGBA image of (C + 1) x (C + 1) cells, the margins included.
    on_diagonal = np.eye(num_classes, dtype=bool)
    correct_cmap, error_cmap = _truncated("Blues", 0.15), _truncated("Reds", 0.3)
    # Precision/recall: pale near 100%, darkening fast below (v**4: 97% -> 0.11, 90% -> 0.34,
    # 70% -> 0.76), so the weak classes are the ones that catch the eye.
    ratio_cmap = _truncated("Purples", 0.06).reversed()
    correct_norm = Normalize(0.0, 1.0 if normalize else max(float(values.diagonal().max()), 1.0))
    error_norm = _error_norm(values[~on_diagonal], normalize)
    ratio_norm = PowerNorm(4.0, vmin=0.0, vmax=1.0)
    undefined = np.array([0.88, 0.88, 0.88, 1.0])
    rgba = np.ones((num_classes + 1, num_classes + 1, 4))  # white: empty cells
    cells = rgba[:num_classes, :num_classes]
    filled = values > 0
    cells[filled & on_diagonal] = correct_cmap(correct_norm(values[filled & on_diagonal]))
    if error_norm is not None:
        cells[filled & ~on_diagonal] = error_cmap(error_norm(values[filled & ~on_diagonal]))
    rgba[num_classes, :num_classes] = np.where(
        (predicted > 0)[:, None], ratio_cmap(ratio_norm(precision)), undefined
    )
    rgba[:num_classes, num_classes] = np.where(
        (support > 0)[:, None], ratio_cmap(ratio_norm(recall)), undefined
    )
    accuracy = correct / total if total else None
    rgba[num_classes, num_classes] = (
        ratio_cmap(ratio_norm(accuracy)) if accuracy is not None else undefined
    )

    # Sizes scale with the number of classes, within what a screen shows; the figure leaves
    # room for the tick labels, the three colour bars (about 1 inch each) and the title.
    if annotate is None:
        annotate = num_classes <= MAX_ANNOTATED_CLASSES
    grid_inches = min(max(0.6 * (num_classes + 1), 4.0), 16.0)
    cell_points = 72 * grid_inches / (num_classes + 1)
    tick_size = max(min(10.0, 0.7 * cell_points), MIN_TICK_POINTS)
    # every `tick_step`-th class is labelled, so labels (1.25 x their size tall) never overlap
    tick_step = max(1, math.ceil(1.25 * tick_size / cell_points))
    panel_inches = 0.0 if annotate else 3.4
    longest = max(len(name) for name in [*names, "recall"])
    # 0.65 em a character: DejaVu Sans' average, with room for wide letters
    name_inches = 0.65 * tick_size * longest / 72 + 0.6
    row_label_inches = 0.65 * tick_size * max(longest, len("precision")) / 72 + 0.8
    rotate = num_classes > MAX_ANNOTATED_CLASSES or 0.6 * tick_size * longest > 0.9 * cell_points
    figure = Figure(
        figsize=(
            grid_inches + row_label_inches + 3.3 + panel_inches,
            grid_inches + 1.2 + (name_inches if rotate else 0.4),
        ),
        layout="constrained",
    )
    if annotate:
        axes = figure.add_subplot()
    else:
        grid = figure.add_gridspec(
            1, 2, width_ratios=(grid_inches + row_label_inches + 3.3, panel_inches)
        )
        axes = figure.add_subplot(grid[0])
        _confusion_panel(figure.add_subplot(grid[1]), counts.numpy(), names)
    axes.imshow(rgba, interpolation="nearest", aspect="equal")

    # Thin white lines between cells; a dark line sets the margins apart from the matrix.
    line_width = min(1.5, cell_points / 25)
    axes.set_xticks(np.arange(num_classes + 1) - 0.5, minor=True)
    axes.set_yticks(np.arange(num_classes + 1) - 0.5, minor=True)
    axes.grid(which="minor", color="white", linewidth=line_width)
    axes.tick_params(which="minor", length=0)
    axes.axhline(num_classes - 0.5, color="0.25", linewidth=2 * line_width + 0.5)
    axes.axvline(num_classes - 0.5, color="0.25", linewidth=2 * line_width + 0.5)

    # the margin's label needs its room too: no class label closer to it than a step
    labelled = [c for c in range(0, num_classes, tick_step) if num_classes - c >= tick_step]
    shown = [names[c] for c in labelled]
    axes.set_xticks([*labelled, num_classes], [*shown, "recall"], fontsize=tick_size)
    axes.set_yticks([*labelled, num_classes], [*shown, "precision"], fontsize=tick_size)
    if rotate:  # names wider than their column: upright, so neighbours never overlap
        axes.tick_params(axis="x", labelrotation=90)
    for labels in (axes.get_xticklabels(), axes.get_yticklabels()):
        labels[-1].set_fontstyle("italic")
    axes.set_xlabel("Predicted label")
    axes.set_ylabel("True label")

    if annotate:
        cell_texts = [
            [_format_fraction(v) if normalize else f"{int(v)}" for v in row] for row in values
        ]
        margin_texts = [
            f"{value:.1%}" if defined else "–"
            for value, defined in [
                *zip(precision, predicted > 0, strict=True),
                *zip(recall, support > 0, strict=True),
                (accuracy or 0.0, accuracy is not None),
            ]
        ]
        widest = max([len(t) for row in cell_texts for t in row] + [len(t) for t in margin_texts])
        font_size = min(11.0, 0.38 * cell_points, 1.5 * cell_points / max(widest, 1))
        # Every value sits inside its cell, inside the axes: the constrained layout need not
        # measure them (the same PNG, 0.12-0.17 s less to render with 10 classes).
        for i in range(num_classes):
            for j in range(num_classes):
                empty = values[i, j] == 0
                axes.text(
                    j,
                    i,
                    cell_texts[i][j],
                    ha="center",
                    va="center",
                    fontsize=font_size,
                    color="0.7" if empty else _text_color(rgba[i, j]),
                    in_layout=False,
                )
        margin_cells = [
            *((num_classes, c) for c in range(num_classes)),
            *((c, num_classes) for c in range(num_classes)),
            (num_classes, num_classes),
        ]
        for (i, j), text in zip(margin_cells, margin_texts, strict=True):
            axes.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=font_size,
                fontweight="bold" if (i, j) == (num_classes, num_classes) else "normal",
                color=_text_color(rgba[i, j]),
                in_layout=False,
            )

    # Colour bars, left to right: correct, errors, precision/recall (constrained layout puts
    # the first one added on the far right).
    unit = "% of true class" if normalize else "count"
    colorbar_options = {"ax": axes, "fraction": 0.035, "pad": 0.015, "aspect": 30}
    ratio_bar = figure.colorbar(
        ScalarMappable(ratio_norm, ratio_cmap),
        label="precision (bottom row), recall (right column)",
        **colorbar_options,
    )
    ratio_bar.set_ticks([0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0])
    ratio_bar.formatter = PercentFormatter(1.0, decimals=0)
    if error_norm is not None:
        error_bar = figure.colorbar(
            ScalarMappable(error_norm, error_cmap),
            label=f"errors, off-diagonal ({unit}, log scale)",
            **colorbar_options,
        )
        error_bar.minorticks_off()
        error_bar.ax.yaxis.set_major_locator(FixedLocator(_log_ticks(error_norm)))
        error_bar.formatter = (
            PercentFormatter(1.0, decimals=None) if normalize else StrMethodFormatter("{x:,.0f}")
        )
    correct_bar = figure.colorbar(
        ScalarMappable(correct_norm, correct_cmap),
        label=f"correct, diagonal ({unit})",
        **colorbar_options,
    )
    if normalize:
        correct_bar.formatter = PercentFormatter(1.0)

    if accuracy is None:
        summary = "no samples"
    else:
        summary = f"accuracy {accuracy:.2%} ({correct:,} of {total:,} correct)"
    if normalize:
        summary += "\nrows normalised: each row sums to 100%, the diagonal is recall"
    if error_norm is None and total:
        summary += " · no errors"
    if tick_step > 1:
        summary += f"\nevery {ordinal(tick_step)} class labelled"
    axes.set_title(f"{title}\n{summary}", fontsize=min(12.0, 9 + grid_inches / 4))
    return figure


def _confusion_panel(axes: Axes, counts: np.ndarray, names: Sequence[str]) -> None:
    """Fill `axes` with the most frequent confusions, two lines each (names may be long)."""
    axes.set_axis_off()
    support = counts.sum(1)
    top = _top_confusions(counts, LISTED_CONFUSIONS)
    lines = [f"Most frequent confusions ({len(top)})", ""]
    for true, predicted, count in top:
        share = count / support[true] if support[true] else 0.0
        lines.append(f"{count:>6,}  {_shorten(names[true], 22)}")
        lines.append(f"{share:>6.0%}  → {_shorten(names[predicted], 20)}")
    if not top:
        lines.append("none: every prediction is right")
    lines += ["", "count, then % of the true class;", "true class → predicted class"]
    axes.text(
        0.0,
        1.0,
        "\n".join(lines),
        va="top",
        ha="left",
        fontsize=8,
        family="monospace",
        transform=axes.transAxes,
    )


# ----------------------------------------------------------------------------------------- hook


class ConfusionAnalysis(Analysis):
    """Per-epoch hook: confusion matrix figure and per-class precision/recall scalars.

    Reads `ctx.eval.targets` and `ctx.eval.predictions` (the pipeline's one evaluation pass);
    writes `plots/confusion_matrix_{epoch}.png` (and `confusion_matrix_normalized_{epoch}.png`
    when `normalize`), and adds `precision/{c}` and `recall/{c}` for every class index c to
    the epoch's metrics (metrics.json and TensorBoard scalars).

    Args:
        normalize: also draw the row-normalised matrix (`--confusion-normalize`).
    """

    name = "confusion"
    figures = (
        FigureInfo(
            "confusion_matrix",
            "Confusion matrix",
            "Held-out images counted by true class (rows) and predicted class (columns).",
        ),
        FigureInfo(
            "confusion_matrix_normalized",
            "Confusion matrix, row-normalised",
            "Each row divided by its class count: the diagonal is each class' recall.",
        ),
    )

    def __init__(self, normalize: bool = False) -> None:
        self.normalize = normalize

    def __call__(self, ctx: EpochContext) -> None:
        """Compute the matrix from `ctx.eval`, record the scalars, save the figure(s)."""
        if ctx.eval is None:
            return
        num_classes = max(len(ctx.class_names), ctx.eval.num_classes)
        names = [*ctx.class_names, *map(str, range(len(ctx.class_names), num_classes))]
        matrix = confusion_matrix(ctx.eval.targets, ctx.eval.predictions, num_classes)
        precision, recall = precision_recall(matrix)
        for c in range(num_classes):
            ctx.metrics[f"precision/{c}"] = float(precision[c])
            ctx.metrics[f"recall/{c}"] = float(recall[c])
        title = f"Confusion matrix, epoch {ctx.epoch}"
        # built and rendered in the pipeline's helper process, if any
        ctx.draw_figure("confusion_matrix", plot_confusion, matrix, names, title=title)
        if self.normalize:
            ctx.draw_figure(
                "confusion_matrix_normalized",
                plot_confusion,
                matrix,
                names,
                normalize=True,
                title=title,
            )

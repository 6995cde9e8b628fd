r"""Deletion and insertion curves: does removing what a map calls important hurt the model?

Petsiuk, Das and Saenko (2018), "RISE: Randomized Input Sampling for Explanation of Black-box
Models", BMVC, section 4.1. Pixels are ranked by attribution, most important first (signed
value, descending; ties broken at random). For a step $s = 0, \dots, k$ the first
$n_s = \mathrm{round}(s \, HW / k)$ ranked pixels $S_s$ are

- **deleted**: replaced by the baseline $x'$ (the blank image), $x^{\mathrm{del}}_s =
  x \odot (1 - m_{S_s}) + x' \odot m_{S_s}$;
- **inserted**: copied from the image into the baseline, $x^{\mathrm{ins}}_s =
  x' \odot (1 - m_{S_s}) + x \odot m_{S_s}$,

and the true-class probability $p_c(\cdot) = \mathrm{softmax}(f(\cdot))_c$ is recorded. The area
under each image's curve over the removed fraction $s / k \in [0, 1]$ (trapezoid rule)
summarises it:

$$ \mathrm{AUC}_{\mathrm{del}} = \int_0^1 p_c(x^{\mathrm{del}}_{t}) \, dt \quad
   (\text{lower is better}), \qquad
   \mathrm{AUC}_{\mathrm{ins}} = \int_0^1 p_c(x^{\mathrm{ins}}_{t}) \, dt \quad
   (\text{higher is better}). $$

A random pixel order is the reference. "Better than random" is a paired test over the images
(`better_than_random`): the one-sided Wilcoxon signed-rank test of each image's AUC against
its random-order AUC (Wilcoxon 1945).

**Only the images that differ are evaluated.** A pixel whose value already equals the baseline
(on MNIST about 80% of them are blank) gives the same composite image whether it is deleted
or not, bit for bit. The composite at step $s$ is therefore fixed by how many of the *other*
pixels are among the first $n_s$; steps where that count does not change reuse the
probability of the first such step, and counts of 0 and of all are the image and the
baseline, evaluated once per image. The curves are exactly those of evaluating every step;
the model sees each distinct composite once, in a few large batches.

**Against Quantus** (`quantus.PixelFlipping` 0.6 with `features_in_step = HW / k` and the
blank value as `perturb_baseline`): the points $s = 1, \dots, k$ are Quantus' curve, value for
value (`bench/vs_quantus.py`; `tests/test_faithfulness.py`). The definitions differ in three
places. exigo's curve also has the point $s = 0$, the intact image. exigo's AUC is over the
deleted fraction (a number in [0, 1] whatever $k$ is); Quantus' `calculate_auc` integrates over
the step index, with $dx = 1$ (and calls `np.trapz`, gone from numpy 2.4). exigo breaks ties in
the ranking at random (seeded); Quantus keeps numpy's `argsort` order, which is arbitrary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from exigo._modes import evaluation_mode
from exigo.analyses._bootstrap import Interval

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "FaithfulnessCurves",
    "better_than_random",
    "curve_auc",
    "deletion_insertion",
    "pixel_order",
    "plot_faithfulness",
    "true_class_probability",
]


def curve_auc(values: Tensor, fractions: Tensor) -> Tensor:
    """Area under each curve over the fraction axis (trapezoid rule).

    Args:
        values: float tensor [..., S], one curve per leading index.
        fractions: float tensor [S], the x positions.

    Returns:
        Float tensor [...].
    """
    return torch.trapezoid(values, fractions, dim=-1)


@dataclass(frozen=True)
class FaithfulnessCurves:
    """Deletion and insertion curves of several pixel orders on the same images.

    Attributes:
        names: name of each order (the attribution methods, then `random`), length M.
        fractions: float tensor [S], fraction of pixels removed/inserted, 0 to 1.
        deletion: float tensor [M, N, S], true-class probability as pixels are deleted.
        insertion: float tensor [M, N, S], true-class probability as pixels are inserted.
        passes: composite images the model evaluated (each distinct one once), ends included.
    """

    names: list[str]
    fractions: Tensor
    deletion: Tensor
    insertion: Tensor
    passes: int = 0

    @property
    def deletion_auc(self) -> Tensor:
        """Float tensor [M]: area under the mean deletion curve (lower is better)."""
        return self.image_deletion_auc.mean(dim=1)

    @property
    def insertion_auc(self) -> Tensor:
        """Float tensor [M]: area under the mean insertion curve (higher is better)."""
        return self.image_insertion_auc.mean(dim=1)

    @property
    def image_deletion_auc(self) -> Tensor:
        """Float tensor [M, N]: area under each image's deletion curve."""
        return curve_auc(self.deletion, self.fractions)

    @property
    def image_insertion_auc(self) -> Tensor:
        """Float tensor [M, N]: area under each image's insertion curve."""
        return curve_auc(self.insertion, self.fractions)


def pixel_order(maps: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Rank of every pixel by attribution, most important first, ties broken at random.

    Args:
        maps: float tensor [N, H, W], signed attributions (one value per pixel).
        generator: CPU generator for the tie-breaking (an all-equal map gives a random order).

    Returns:
        int64 tensor [N, H * W]: `rank[n, j]` is the position of pixel `j` (row-major) in
        image n's order, 0 for the most important.
    """
    scores = maps.detach().flatten(1).float().cpu()  # (N, HW)
    shuffle = torch.rand(scores.shape, generator=generator).argsort(dim=1)
    shuffled_scores = scores.gather(1, shuffle)
    # A stable sort of a randomly shuffled row keeps equal scores in random order.
    by_score = shuffled_scores.argsort(dim=1, descending=True, stable=True)
    order = shuffle.gather(1, by_score)  # pixel indices, most important first
    rank = torch.empty_like(order)
    positions = torch.arange(order.shape[1]).expand_as(order)
    rank.scatter_(1, order, positions)
    return rank


@torch.no_grad()
def true_class_probability(
    model: nn.Module, images: Tensor, targets: Tensor, batch_size: int
) -> Tensor:
    """Softmax probability of each image's target class, in batches, in eval mode.

    Args:
        model: classifier mapping [B, C, H, W] to logits [B, K].
        images: float tensor [P, C, H, W] on the model's device.
        targets: int64 tensor [P] on the same device.
        batch_size: images per forward pass.

    Returns:
        Float tensor [P] on the CPU.
    """
    out = []
    with evaluation_mode(model):
        for image_batch, target_batch in zip(
            images.split(batch_size), targets.split(batch_size), strict=True
        ):
            probabilities = model(image_batch).float().softmax(dim=1)
            out.append(probabilities.gather(1, target_batch[:, None]).squeeze(1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def deletion_insertion(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    maps: Tensor,
    baseline: Tensor,
    *,
    names: Sequence[str],
    steps: int = 56,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> FaithfulnessCurves:
    """Deletion and insertion curves of each attribution map, plus a random-order reference.

    The model runs forward only, without gradients, in eval mode (each module's mode is
    restored afterwards). Each distinct composite image is evaluated once (see the module
    docstring): the curves equal those of evaluating every step.

    Args:
        model: classifier mapping [B, C, H, W] to logits [B, K].
        images: float tensor [N, C, H, W] as the model takes them, on the model's device.
        targets: int64 tensor [N], the class whose probability is tracked.
        maps: float tensor [M, N, H, W], one signed attribution per method and image.
        baseline: float tensor [1, C, H, W] (or [N, C, H, W]): what a deleted pixel becomes.
        names: M method names; `random` is appended for the reference order.
        steps: k, the number of deletion/insertion steps (k + 1 points per curve).
        batch_size: composite images per forward pass.
        generator: CPU generator for the random order and for breaking ties.

    Returns:
        `FaithfulnessCurves` with M + 1 orders (the last is `random`), on the CPU.
    """
    if maps.ndim != 4 or maps.shape[1:] != (images.shape[0], *images.shape[2:]):
        raise ValueError(
            f"maps must be [M, N, H, W] matching images {tuple(images.shape)}, "
            f"got {tuple(maps.shape)}"
        )
    if len(names) != maps.shape[0]:
        raise ValueError(f"{len(names)} names for {maps.shape[0]} maps")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    count, height, width = images.shape[0], images.shape[2], images.shape[3]
    device = images.device
    baseline = baseline.to(device=device, dtype=images.dtype).expand_as(images)
    ranks = torch.stack(
        [pixel_order(method_maps, generator) for method_maps in maps]
        + [pixel_order(torch.zeros(count, height, width), generator)]  # all ties: random
    )  # (O, N, HW), O = M + 1
    fractions = torch.linspace(0, 1, steps + 1)
    kept = torch.round(fractions * height * width).long()  # n_s pixels at step s

    # The image itself and the baseline: every curve's ends, and every step whose composite
    # equals one of them.
    full = true_class_probability(model, images, targets, batch_size)
    empty = true_class_probability(model, baseline, targets, batch_size)
    changed = (images != baseline).any(dim=1).flatten(1).cpu()  # (N, HW)
    effective, first = _distinct_steps(ranks, changed, kept)
    tasks = first.nonzero()  # (T, 3): order, image, step of each distinct composite
    deleted_p, inserted_p = _composite_probabilities(
        model, images, targets, baseline, ranks, kept, tasks, batch_size
    )
    # Every step takes the probability of the first step with the same count.
    group = first.flatten().long().cumsum(0).view_as(first) - 1  # index into tasks
    interior = (effective > 0) & (effective < effective[..., -1:])
    deletion = torch.where(interior, deleted_p[group.clamp_min(0)], 0.0)
    insertion = torch.where(interior, inserted_p[group.clamp_min(0)], 0.0)
    none, every = effective == 0, effective == effective[..., -1:]
    full_, empty_ = full[None, :, None], empty[None, :, None]
    deletion = torch.where(none, full_, torch.where(every & ~none, empty_, deletion))
    insertion = torch.where(none, empty_, torch.where(every & ~none, full_, insertion))
    # Step 0 is the intact image and step k the baseline, whatever the pixels are.
    deletion[..., 0], deletion[..., -1] = full, empty
    insertion[..., 0], insertion[..., -1] = empty, full
    return FaithfulnessCurves(
        names=[*names, "random"],
        fractions=fractions,
        deletion=deletion,
        insertion=insertion,
        passes=2 * count + 2 * tasks.shape[0],
    )


def _distinct_steps(ranks: Tensor, changed: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
    """How many changing pixels each step removes, and the first step of each count.

    Args:
        ranks: int64 [O, N, HW], each pixel's position in each order.
        changed: bool [N, HW], pixels whose value differs from the baseline.
        kept: int64 [S], pixels removed at each step.

    Returns:
        `effective`: int64 [O, N, S], the changing pixels among the first `kept[s]`;
        `first`: bool [O, N, S], steps whose composite is new (neither the image, nor the
        baseline, nor the composite of the step before).
    """
    order = ranks.argsort(dim=-1)  # pixel indices, most important first
    changed_in_order = changed[None].expand_as(order).gather(-1, order).long()
    cumulative = torch.cat(
        [torch.zeros(*order.shape[:2], 1, dtype=torch.long), changed_in_order.cumsum(-1)], -1
    )  # (O, N, HW + 1): changing pixels among the first j
    effective = cumulative[..., kept]  # (O, N, S)
    total = changed.sum(-1)[None, :, None]
    previous = torch.cat([torch.full_like(effective[..., :1], -1), effective[..., :-1]], -1)
    first = (effective > 0) & (effective < total) & (effective != previous)
    return effective, first


def _composite_probabilities(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    baseline: Tensor,
    ranks: Tensor,
    kept: Tensor,
    tasks: Tensor,
    batch_size: int,
) -> tuple[Tensor, Tensor]:
    """True-class probability [T] of the deleted and of the inserted composite of each task."""
    height, width = images.shape[2:]
    deleted_p, inserted_p = [], []
    device = images.device
    # Bound memory: composites for about 8 forward batches exist at once.
    for chunk in tasks.split(max(1, 4 * batch_size)):
        order, image, step = chunk.unbind(1)
        mask = (ranks[order, image] < kept[step][:, None]).view(-1, 1, height, width)
        mask = mask.to(device)
        source = images[image.to(device)]
        blank = baseline[image.to(device)]
        composites = torch.cat([torch.where(mask, blank, source), torch.where(mask, source, blank)])
        labels = targets[image.to(device)].repeat(2)
        probabilities = true_class_probability(model, composites, labels, batch_size)
        deleted_p.append(probabilities[: chunk.shape[0]])
        inserted_p.append(probabilities[chunk.shape[0] :])
        del composites
    if not deleted_p:
        return torch.zeros(1), torch.zeros(1)
    return torch.cat(deleted_p), torch.cat(inserted_p)


def better_than_random(method_auc: Tensor, random_auc: Tensor, *, lower_is_better: bool) -> Tensor:
    """One-sided Wilcoxon signed-rank test of each method against the random order, per image.

    The test is paired: image n's AUC under the method against image n's AUC under the random
    order. The null hypothesis: the differences are symmetric about 0 (the method ranks pixels
    no better than chance). Images with equal AUCs are left out (`zero_method="wilcox"`).

    Args:
        method_auc: float tensor [M, N], each method's per-image AUC.
        random_auc: float tensor [N], the random order's.
        lower_is_better: True for deletion (alternative: the method's AUC is lower), False
            for insertion and ROAD's least-relevant-first curve.

    Returns:
        Float tensor [M], one-sided p-values; 1 where every difference is 0.
    """
    from scipy.stats import wilcoxon

    differences = (method_auc - random_auc[None]).double().cpu().numpy()
    p_values = np.ones(differences.shape[0])
    informative = np.any(differences != 0, axis=1)
    if informative.any():
        result = wilcoxon(
            differences[informative],
            alternative="less" if lower_is_better else "greater",
            zero_method="wilcox",
            axis=1,
        )
        p_values[informative] = result.pvalue
    return torch.from_numpy(np.where(np.isnan(p_values), 1.0, p_values)).float()


def plot_faithfulness(
    names: Sequence[str],
    labels: Mapping[str, str],
    fractions: Tensor,
    deletion: Interval,
    insertion: Interval,
    road_fractions: Tensor,
    most_relevant_first: Interval,
    least_relevant_first: Interval,
    legends: Mapping[str, Sequence[str]],
    title: str,
) -> Figure:
    """Mean deletion, insertion and ROAD curves of every order, with their bootstrap bands.

    Args:
        names: the O orders' keys (the methods, then `random`).
        labels: key -> display name.
        fractions: float tensor [S], the deletion/insertion x positions.
        deletion: `Interval` of tensors [O, S], the mean deletion curves.
        insertion: `Interval` [O, S], the mean insertion curves.
        road_fractions: float tensor [R], ROAD's removed fractions.
        most_relevant_first: `Interval` [O, R], ROAD's MoRF curves.
        least_relevant_first: `Interval` [O, R], ROAD's LeRF curves.
        legends: `deletion`, `insertion`, `road_morf`, `road_lerf` -> one legend text per
            order (AUC with its interval, p-value against the random order).
        title: the figure's title.

    Returns:
        A matplotlib Figure with four panels.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 9))
    figure.subplots_adjust(left=0.05, right=0.98, bottom=0.1, top=0.91, wspace=0.18, hspace=0.3)
    grid = figure.subplots(2, 2)
    panels = (
        (grid[0, 0], fractions, deletion, "deletion", "deleted (set to blank)", "lower"),
        (grid[0, 1], fractions, insertion, "insertion", "inserted into the blank image", "higher"),
        (
            grid[1, 0],
            road_fractions,
            most_relevant_first,
            "road_morf",
            "removed and imputed, most relevant first",
            "lower",
        ),
        (
            grid[1, 1],
            road_fractions,
            least_relevant_first,
            "road_lerf",
            "removed and imputed, least relevant first",
            "higher",
        ),
    )
    titles = {
        "deletion": "deletion (Petsiuk et al. 2018)",
        "insertion": "insertion (Petsiuk et al. 2018)",
        "road_morf": "ROAD, most relevant first (Rong et al. 2022)",
        "road_lerf": "ROAD, least relevant first (Rong et al. 2022)",
    }
    for axes, x, curves, part, verb, better in panels:
        x_values = x.numpy()
        for index, key in enumerate(names):
            random_order = key == "random"
            colour = "black" if random_order else f"C{index}"
            axes.plot(
                x_values,
                curves.mean[index].numpy(),
                color=colour,
                linestyle="--" if random_order else "-",
                linewidth=1.2,
                label=legends[part][index],
            )
            axes.fill_between(
                x_values,
                curves.low[index].numpy(),
                curves.high[index].numpy(),
                color=colour,
                alpha=0.12,
                linewidth=0,
            )
        axes.set_xlabel(f"fraction of pixels {verb}")
        axes.set_ylabel("true-class probability, mean")
        axes.set_title(f"{titles[part]}: AUC {better} is better", fontsize=10)
        axes.set_ylim(-0.02, 1.02)
        axes.grid(alpha=0.3)
        axes.legend(
            fontsize=7,
            loc="upper right" if better == "lower" else "lower right",
            title="mean AUC [95% CI]  p: paired Wilcoxon vs random",
            title_fontsize=7,
        )
    figure.suptitle(title, fontsize=11)
    figure.text(
        0.5,
        0.015,
        "Bands: 95% bootstrap intervals of the mean over the check images. p: one-sided "
        "Wilcoxon signed-rank test of each image's AUC against its random-order AUC.",
        ha="center",
        fontsize=8,
        color="0.3",
    )
    return figure

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
under each curve over the removed fraction $s / k \in [0, 1]$ (trapezoid rule) summarises it:

$$ \mathrm{AUC}_{\mathrm{del}} = \int_0^1 p_c(x^{\mathrm{del}}_{t}) \, dt \quad
   (\text{lower is better}), \qquad
   \mathrm{AUC}_{\mathrm{ins}} = \int_0^1 p_c(x^{\mathrm{ins}}_{t}) \, dt \quad
   (\text{higher is better}). $$

A random pixel order is the reference: a map that does not beat it on both curves says nothing
about what the model uses. Every composite image of every order and step goes through the
model in a few large forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from exigo._modes import evaluation_mode

__all__ = ["FaithfulnessCurves", "deletion_insertion", "pixel_order"]


@dataclass(frozen=True)
class FaithfulnessCurves:
    """Deletion and insertion curves of several pixel orders on the same images.

    Attributes:
        names: name of each order (the attribution methods, then `random`), length M.
        fractions: float tensor [S], fraction of pixels removed/inserted, 0 to 1.
        deletion: float tensor [M, N, S], true-class probability as pixels are deleted.
        insertion: float tensor [M, N, S], true-class probability as pixels are inserted.
    """

    names: list[str]
    fractions: Tensor
    deletion: Tensor
    insertion: Tensor

    @property
    def deletion_auc(self) -> Tensor:
        """Float tensor [M]: area under the mean deletion curve (lower is better)."""
        return torch.trapezoid(self.deletion.mean(dim=1), self.fractions, dim=-1)

    @property
    def insertion_auc(self) -> Tensor:
        """Float tensor [M]: area under the mean insertion curve (higher is better)."""
        return torch.trapezoid(self.insertion.mean(dim=1), self.fractions, dim=-1)


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
def _true_class_probability(
    model: nn.Module, images: Tensor, targets: Tensor, batch_size: int
) -> Tensor:
    """Float tensor [K] on the CPU: softmax probability of `targets` [K] for `images` [K, ...]."""
    out = []
    with evaluation_mode(model):
        for image_batch, target_batch in zip(
            images.split(batch_size), targets.split(batch_size), strict=True
        ):
            probabilities = model(image_batch).float().softmax(dim=1)
            out.append(probabilities.gather(1, target_batch[:, None]).squeeze(1).cpu())
    return torch.cat(out)


def deletion_insertion(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    maps: Tensor,
    baseline: Tensor,
    *,
    names: Sequence[str],
    steps: int = 10,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> FaithfulnessCurves:
    """Deletion and insertion curves of each attribution map, plus a random-order reference.

    The model runs forward only, without gradients, in eval mode (each module's mode is
    restored afterwards).

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
    orders = len(names) + 1
    ranks = torch.stack(
        [pixel_order(method_maps, generator) for method_maps in maps]
        + [pixel_order(torch.zeros(count, height, width), generator)]  # all ties: random
    ).to(device)  # (M + 1, N, HW)
    fractions = torch.linspace(0, 1, steps + 1)
    kept = torch.round(fractions * height * width).long()  # n_s pixels at step s

    # The ends of every curve are the image itself and the blank baseline: computed once.
    full = _true_class_probability(model, images, targets, batch_size)
    empty = _true_class_probability(model, baseline, targets, batch_size)
    deletion = torch.empty(orders, count, steps + 1)
    insertion = torch.empty(orders, count, steps + 1)
    deletion[:, :, 0], deletion[:, :, -1] = full, empty
    insertion[:, :, 0], insertion[:, :, -1] = empty, full
    if steps > 1:
        interior = kept[1:-1].to(device)  # (k - 1,)
        # Bound memory: at most ~16 forward batches of composites exist at once.
        per_image = 2 * orders * (steps - 1)
        chunk = max(1, 16 * batch_size // per_image)
        for start in range(0, count, chunk):
            part = slice(start, min(start + chunk, count))
            deletion[:, part, 1:-1], insertion[:, part, 1:-1] = _interior_points(
                model,
                images[part],
                targets[part],
                baseline[part],
                ranks[:, part],
                interior,
                batch_size,
            )
    return FaithfulnessCurves(
        names=[*names, "random"], fractions=fractions, deletion=deletion, insertion=insertion
    )


def _interior_points(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    baseline: Tensor,
    ranks: Tensor,
    kept: Tensor,
    batch_size: int,
) -> tuple[Tensor, Tensor]:
    """Deletion and insertion probabilities [O, N, S] at the S interior steps of O orders."""
    orders, count = ranks.shape[:2]
    channels, height, width = images.shape[1:]
    steps = kept.numel()
    # mask[o, s, n, 1, H, W]: the pixel is among the first n_s of order o for image n
    mask = ranks[:, None, :, :] < kept[None, :, None, None]
    mask = mask.view(orders, steps, count, 1, height, width).to(images.dtype)
    deleted = images * (1 - mask) + baseline * mask  # (O, S, N, C, H, W)
    inserted = baseline * (1 - mask) + images * mask
    composites = torch.stack([deleted, inserted]).view(-1, channels, height, width)
    probabilities = _true_class_probability(
        model, composites, targets.repeat(2 * orders * steps), batch_size
    ).view(2, orders, steps, count)
    return probabilities[0].permute(0, 2, 1), probabilities[1].permute(0, 2, 1)

r"""ROAD: remove pixels by attribution and fill them in from their neighbours (Rong et al. 2022).

Rong, Leemann, Borisov, Kasneci and Kasneci (2022), "A Consistent and Efficient Evaluation
Strategy for Attribution Methods", ICML. Deleting pixels to a blank value (`faithfulness`)
makes images the model never saw, so part of the drop it measures is the model's reaction to
an unusual image, not to missing evidence. ROAD (RemOve And Debias) removes the same pixels
but replaces them by *noisy linear imputation*: every removed pixel $i$ becomes the weighted
mean of its 8 neighbours $\mathcal{N}(i)$ inside the image (weight $1/6$ for the 4 direct
neighbours, $1/12$ for the diagonal ones), removed neighbours included, which is one sparse
linear system per image and channel, with $R$ the removed pixels, $N_i = \mathcal{N}(i)$ and
$d_i = \sum_{j \in N_i} w_{ij}$:

$$ d_i \hat x_i - \sum_{j \in N_i \cap R} w_{ij} \hat x_j = \sum_{j \in N_i - R} w_{ij} x_j $$

plus Gaussian noise $\mathcal{N}(0, \sigma^2)$, $\sigma = 0.01$ in the model's input units as in
the paper's code, so that the imputed region carries no trace of the mask's shape.

Two orders per map: **MoRF** (most relevant first: removing the top-ranked pixels should make
the true-class probability fall fast, lower AUC is better) and **LeRF** (least relevant first:
removing the bottom-ranked pixels should leave it high, higher AUC is better), at removed
fractions $0, 0.1, \dots, 0.9$ as in the paper. The AUC is the area under each image's curve
divided by the span of the fractions: a mean probability in [0, 1].

The systems are symmetric positive definite (every connected group of removed pixels touches
a kept one when some pixel is kept) and are solved all at once, batched, by conjugate
gradients with a Jacobi preconditioner, each step a few shifted additions, starting from the
mean of the kept pixels, and each system leaving the batch once its residual is 1e-5 of its
right-hand side: errors 25 times below the noise (`tests/test_road.py` compares with the
paper's sparse direct solve).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exigo.analyses.faithfulness import curve_auc, pixel_order, true_class_probability

__all__ = ["RoadCurves", "noisy_linear_imputation", "road_curves"]

#: Neighbour weights of the imputation (ROAD's `neighbors_weights`).
_DIRECT, _DIAGONAL = 1 / 6, 1 / 12


def _neighbour_sum(values: Tensor) -> Tensor:
    """Weighted sum over each pixel's in-image neighbours: [B, 1, H, W] -> [B, 1, H, W].

    Shifted additions of the zero-padded images (outside neighbours add nothing): four times
    faster than a 3 x 3 `conv2d` with one input channel on the CPU.
    """
    padded = F.pad(values, (1, 1, 1, 1))
    diagonal = padded[..., :-2, :-2] + padded[..., :-2, 2:] + padded[..., 2:, :-2]
    diagonal = diagonal + padded[..., 2:, 2:]
    direct = padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:] + padded[..., :-2, 1:-1]
    direct = direct + padded[..., 2:, 1:-1]
    return diagonal * _DIAGONAL + direct * _DIRECT


def noisy_linear_imputation(
    images: Tensor,
    removed: Tensor,
    *,
    noise: float = 0.01,
    generator: torch.Generator | None = None,
    tolerance: float = 1e-5,
) -> Tensor:
    """Fill the removed pixels of each image from their neighbours, plus noise (ROAD).

    Args:
        images: float tensor [B, C, H, W].
        removed: bool tensor [B, 1, H, W] (or [B, H, W]), the pixels to replace.
        noise: standard deviation of the Gaussian noise added to the imputed pixels, in the
            images' units.
        generator: CPU generator of the noise.
        tolerance: the solve stops when every system's residual norm is below `tolerance`
            times its right-hand side's norm. The default leaves errors 25 times smaller
            than the default noise (measured on MNIST's ROAD masks: 4e-4 at most).

    Returns:
        Float tensor [B, C, H, W]: the kept pixels unchanged, the removed ones imputed.
    """
    count, channels, height, width = images.shape
    removed = removed.reshape(count, 1, height, width)
    mask = removed.to(images.dtype).repeat_interleave(channels, dim=0)  # (B * C, 1, H, W)
    values = images.detach().reshape(count * channels, 1, height, width)
    degree = _neighbour_sum(images.new_ones(1, 1, height, width))  # weights inside the image

    def apply(x: Tensor) -> Tensor:  # the system matrix, on the removed pixels
        return mask * (degree * x - _neighbour_sum(mask * x))

    def total(x: Tensor) -> Tensor:
        return x.sum(dim=(1, 2, 3), keepdim=True)

    rhs = mask * _neighbour_sum(values * (1 - mask))
    # first guess: the mean of the kept pixels (the background, in the large holes)
    kept = total(1 - mask).clamp_min(1)
    solution = mask * (total(values * (1 - mask)) / kept)
    residual = rhs - apply(solution)
    preconditioned = residual / degree
    direction = preconditioned
    product = total(residual * preconditioned)
    limit = tolerance * rhs.flatten(1).norm(dim=1)
    solved = solution.clone()
    active = torch.arange(solution.shape[0], device=solution.device)
    # CG converges in at most as many steps as unknowns; systems leave the batch once solved
    for _ in range(height * width):
        done = residual.flatten(1).norm(dim=1) <= limit
        if bool(done.any()):
            solved[active[done]] = solution[done]
            going = ~done
            if not bool(going.any()):
                break
            active, mask, solution, residual = (
                active[going],
                mask[going],
                solution[going],
                residual[going],
            )
            direction, product, limit = direction[going], product[going], limit[going]
            preconditioned = preconditioned[going]
        applied = apply(direction)
        curvature = total(direction * applied)
        step = torch.where(curvature > 0, product / curvature.clamp_min(1e-30), 0.0)
        solution = solution + step * direction
        residual = residual - step * applied
        preconditioned = residual / degree
        new_product = total(residual * preconditioned)
        ratio = torch.where(product > 0, new_product / product.clamp_min(1e-30), 0.0)
        direction = preconditioned + ratio * direction
        product = new_product
    else:
        solved[active] = solution
    solution = solved
    solution = solution.reshape(count, channels, height, width)
    jitter = torch.randn(solution.shape, generator=generator).to(solution) * noise
    return torch.where(removed, solution + jitter, images)


@dataclass(frozen=True)
class RoadCurves:
    """ROAD curves of several pixel orders on the same images.

    Attributes:
        names: name of each order (the attribution methods, then `random`), length M.
        fractions: float tensor [S], fraction of pixels removed, from 0.
        most_relevant_first: float tensor [M, N, S], true-class probability as the
            top-ranked pixels are removed and imputed (MoRF).
        least_relevant_first: float tensor [M, N, S], the same for the bottom-ranked pixels
            (LeRF).
        passes: composite images the model evaluated.
    """

    names: list[str]
    fractions: Tensor
    most_relevant_first: Tensor
    least_relevant_first: Tensor
    passes: int = 0

    def _auc(self, curves: Tensor) -> Tensor:
        span = float(self.fractions[-1] - self.fractions[0]) or 1.0
        return curve_auc(curves, self.fractions) / span

    @property
    def image_morf_auc(self) -> Tensor:
        """Float tensor [M, N]: each image's MoRF AUC over the span (lower is better)."""
        return self._auc(self.most_relevant_first)

    @property
    def image_lerf_auc(self) -> Tensor:
        """Float tensor [M, N]: each image's LeRF AUC over the span (higher is better)."""
        return self._auc(self.least_relevant_first)


def road_curves(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    maps: Tensor,
    *,
    names: Sequence[str],
    fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    noise: float = 0.01,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> RoadCurves:
    """MoRF and LeRF curves with noisy linear imputation, of each map and a random order.

    The model runs forward only, without gradients, in eval mode (each module's mode is
    restored afterwards).

    Args:
        model: classifier mapping [B, C, H, W] to logits [B, K].
        images: float tensor [N, C, H, W] as the model takes them, on the model's device.
        targets: int64 tensor [N], the class whose probability is tracked.
        maps: float tensor [M, N, H, W], one signed attribution per method and image.
        names: M method names; `random` is appended for the reference order.
        fractions: removed fractions, ascending, in [0, 1) (at 1 nothing is left to impute
            from).
        noise: standard deviation of the imputation noise, in the images' units.
        batch_size: composite images per forward pass.
        generator: CPU generator of the random order, the tie-breaking and the noise.

    Returns:
        `RoadCurves` with M + 1 orders (the last is `random`), on the CPU.
    """
    if maps.ndim != 4 or maps.shape[1:] != (images.shape[0], *images.shape[2:]):
        raise ValueError(
            f"maps must be [M, N, H, W] matching images {tuple(images.shape)}, "
            f"got {tuple(maps.shape)}"
        )
    if len(names) != maps.shape[0]:
        raise ValueError(f"{len(names)} names for {maps.shape[0]} maps")
    points = torch.tensor(list(fractions), dtype=torch.float32)
    if points.numel() == 0 or (points < 0).any() or (points >= 1).any():
        raise ValueError(f"fractions must lie in [0, 1), got {list(fractions)}")
    count, height, width = images.shape[0], images.shape[2], images.shape[3]
    ranks = torch.stack(
        [pixel_order(method_maps, generator) for method_maps in maps]
        + [pixel_order(torch.zeros(count, height, width), generator)]
    )  # (O, N, HW)
    orders = ranks.shape[0]
    removed_counts = torch.round(points * height * width).long()  # (S,)
    steps = removed_counts.numel()
    # tasks: (order, image, step, least-relevant-first) for every step that removes pixels
    grid = torch.cartesian_prod(
        torch.arange(orders), torch.arange(count), torch.arange(steps), torch.arange(2)
    )
    grid = grid[removed_counts[grid[:, 2]] > 0]
    full = true_class_probability(model, images, targets, batch_size)
    values = torch.empty(grid.shape[0])
    device = images.device
    for start in range(0, grid.shape[0], 8 * batch_size):
        chunk = grid[start : start + 8 * batch_size]
        order, image, step, least = chunk.unbind(1)
        rank = ranks[order, image]  # (T, HW)
        removed_here = removed_counts[step][:, None]
        first = rank < removed_here
        last = rank >= height * width - removed_here
        mask = torch.where(least[:, None].bool(), last, first).view(-1, 1, height, width)
        composites = noisy_linear_imputation(
            images[image.to(device)], mask.to(device), noise=noise, generator=generator
        )
        values[start : start + chunk.shape[0]] = true_class_probability(
            model, composites, targets[image.to(device)], batch_size
        )
    curves = full[None, :, None, None].repeat(orders, 1, steps, 2)  # (O, N, S, 2)
    curves[grid[:, 0], grid[:, 1], grid[:, 2], grid[:, 3]] = values
    return RoadCurves(
        names=[*names, "random"],
        fractions=points,
        most_relevant_first=curves[..., 0],
        least_relevant_first=curves[..., 1],
        passes=count + grid.shape[0],
    )

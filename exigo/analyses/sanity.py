r"""Model-randomisation sanity check: does an attribution map depend on what the model learned?

Adebayo, Gilmer, Muelly, Goodfellow, Hardt and Kim (2018), "Sanity Checks for Saliency Maps",
NeurIPS. The layers of a *copy* of the model are re-initialised one after another from the
output down (cascading randomisation) and the maps recomputed. A map that stays the same when
the weights it should explain are destroyed is not explaining the model; it might be an edge
detector, or the image itself.

Similarity between the original map $a$ and the randomised map $\tilde a$ of one image:

- Spearman rank correlation of the absolute values, as Adebayo et al. report it (their
  figures show both; the absolute value makes a map whose sign flips with the random weights
  but whose layout stays count as unchanged):
  $\rho = \mathrm{corr}(\mathrm{rank}\,|a|, \mathrm{rank}\,|\tilde a|)$, ties given their
  average rank, over the pixels where $a$ or $\tilde a$ is non-zero. Pixels where both are
  exactly 0 are left out because those zeros come from the image, whatever the weights:
  Integrated Gradients is exactly 0 wherever the image equals its baseline, and occluding
  blank pixels changes nothing. On MNIST about 80% of the pixels are blank, and with them
  left in, the Integrated Gradients maps of the trained and of a fully random network
  correlate at 0.99 (measured); without them, at about 0.4;
- SSIM (Wang, Bovik, Sheikh and Simoncelli 2004) of $|a| / \max|a|$ and
  $|\tilde a| / \max|\tilde a|$ with an $11 \times 11$ Gaussian window ($\sigma = 1.5$),
  data range 1:

$$ \mathrm{SSIM}(u, v) = \frac{(2 \mu_u \mu_v + C_1)(2 \sigma_{uv} + C_2)}
   {(\mu_u^2 + \mu_v^2 + C_1)(\sigma_u^2 + \sigma_v^2 + C_2)}, \quad
   C_1 = 0.01^2,\ C_2 = 0.03^2, $$

averaged over the window positions that fit inside the image.

A layer is one module that owns parameters and has `reset_parameters()`; re-initialising it is
exactly what constructing it did. BatchNorm's `reset_parameters()` also resets its running
statistics to mean 0 and variance 1, so a randomised BatchNorm in eval mode is a finite
affine map (no NaN). The trained model is only read: its copy is made with `copy.deepcopy`.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exigo.analyses._filters import gaussian_kernel
from exigo.analyses._random import seeded
from exigo.analyses._ranks import average_ranks

__all__ = [
    "Explainer",
    "RandomisationResult",
    "cascading_randomisation",
    "randomisable_layers",
    "spearman",
    "ssim",
]

#: Added to the seed of the re-initialisation: a model built right after `torch.manual_seed(s)`
#: would otherwise get its own initial weights back when randomised with seed s.
_SEED_OFFSET = 7_919

#: `explain(model, images [N, C, H, W], targets [N]) -> maps [M, N, H, W]`.
Explainer = Callable[[nn.Module, Tensor, Tensor], Tensor]


def spearman(first: Tensor, second: Tensor, *, ignore_joint_zeros: bool = False) -> Tensor:
    r"""Spearman rank correlation of each row pair, with average ranks for ties.

    The Pearson correlation of the rows' average ranks (`exigo.analyses._ranks.average_ranks`,
    all rows at once; equal to `scipy.stats.spearmanr` row by row). Positions where either row
    is NaN are left out (`spearmanr(..., nan_policy="omit")`); -inf and inf are ranked like
    other values. A row that is constant (or has fewer than two values left) has no ranking;
    its correlation is reported as 0, not NaN.

    Args:
        first: float tensor [N, ...]; each row is flattened.
        second: float tensor of the same shape.
        ignore_joint_zeros: leave out the positions where both rows are exactly 0. Such zeros
            come from the input, not the model (Integrated Gradients gives exactly 0 wherever
            the image equals the baseline; occluding blank pixels changes nothing), and a
            large tie block of them makes any two maps of the same image correlate.

    Returns:
        Float tensor [N] in [-1, 1], on the CPU.
    """
    if first.shape != second.shape:
        raise ValueError(f"shapes differ: {tuple(first.shape)} and {tuple(second.shape)}")
    # widened by numpy: torch's .double() of 60 maps took 12 ms on two busy cores (8 us on one)
    a_rows = first.detach().flatten(1).cpu().numpy().astype(np.float64)  # (N, D)
    b_rows = second.detach().flatten(1).cpu().numpy().astype(np.float64)
    kept = (a_rows != 0) | (b_rows != 0) if ignore_joint_zeros else np.ones(a_rows.shape, bool)
    kept &= ~(np.isnan(a_rows) | np.isnan(b_rows))  # a NaN has no rank: its position is left out
    a_ranks, b_ranks = (average_ranks(rows, kept) for rows in (a_rows, b_rows))
    mean_rank = (kept.sum(axis=1, keepdims=True) + 1) / 2  # that of any n average ranks
    a_centred = np.where(kept, a_ranks - mean_rank, 0.0)
    b_centred = np.where(kept, b_ranks - mean_rank, 0.0)
    denominator = np.sqrt(np.square(a_centred).sum(axis=1) * np.square(b_centred).sum(axis=1))
    correlation = (a_centred * b_centred).sum(axis=1) / np.maximum(denominator, 1e-300)
    return torch.from_numpy(np.where(denominator > 0, correlation, 0.0)).float()


def ssim(
    first: Tensor,
    second: Tensor,
    *,
    data_range: float = 1.0,
    window: int = 11,
    sigma: float = 1.5,
) -> Tensor:
    r"""Mean structural similarity of each image pair (Wang et al. 2004).

    The window shrinks to the largest odd size that fits when the images are smaller than it.

    Args:
        first: float tensor [N, H, W].
        second: float tensor [N, H, W].
        data_range: the dynamic range of the values (1 for maps scaled to [0, 1]).
        window: side of the Gaussian window, in pixels (odd).
        sigma: standard deviation of the Gaussian window, in pixels.

    Returns:
        Float tensor [N], 1 for identical images, on the CPU.
    """
    if first.shape != second.shape or first.ndim != 3:
        raise ValueError(
            f"expected two [N, H, W] tensors, got {tuple(first.shape)} and {tuple(second.shape)}"
        )
    u = first.detach().double().cpu()[:, None]  # (N, 1, H, W)
    v = second.detach().double().cpu()[:, None]
    size = min(window, *(side if side % 2 else side - 1 for side in u.shape[-2:]))
    profile = gaussian_kernel(size, sigma, dtype=u.dtype)
    kernel = (profile[:, None] * profile[None, :])[None, None]  # (1, 1, size, size)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mean_u, mean_v = F.conv2d(u, kernel), F.conv2d(v, kernel)
    var_u = F.conv2d(u * u, kernel) - mean_u.square()
    var_v = F.conv2d(v * v, kernel) - mean_v.square()
    covariance = F.conv2d(u * v, kernel) - mean_u * mean_v
    index = ((2 * mean_u * mean_v + c1) * (2 * covariance + c2)) / (
        (mean_u.square() + mean_v.square() + c1) * (var_u + var_v + c2)
    )
    return index.mean(dim=(1, 2, 3)).float()


def _unit_magnitude(maps: Tensor) -> Tensor:
    """|maps| [N, H, W] divided by each map's maximum (an all-zero map stays zero)."""
    magnitude = maps.detach().abs().double().cpu()
    peak = magnitude.flatten(1).amax(dim=1).clamp_min(1e-300)
    return magnitude / peak[:, None, None]


def randomisable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers a cascading randomisation re-initialises, from the output down.

    A layer is a module with parameters of its own and a `reset_parameters()` method. The
    order is the reverse of registration order, which is the forward order for models built
    as `nn.Sequential` blocks (as most classifiers are).

    Args:
        model: the classifier (not modified).

    Returns:
        `(qualified name, module)` pairs, top layer first.
    """
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if callable(getattr(module, "reset_parameters", None))
        and any(True for _ in module.parameters(recurse=False))
    ]
    return layers[::-1]


@dataclass(frozen=True)
class RandomisationResult:
    """How much each method's maps change as the model's layers are randomised top-down.

    Stage i means: every layer from the top down to `layers[i]` re-initialised.

    Attributes:
        layers: name of the deepest layer randomised at each stage, length L.
        depth: int64 tensor [L], number of layers randomised at each stage.
        total_layers: number of randomisable layers in the model.
        spearman: float tensor [L, M], mean over images of the rank correlation of |maps|.
        ssim: float tensor [L, M], mean over images of the SSIM of the scaled |maps|.
        maps: float tensor [L, M, N, H, W], the randomised models' maps, on the CPU.
    """

    layers: list[str]
    depth: Tensor
    total_layers: int
    spearman: Tensor
    ssim: Tensor
    maps: Tensor


def _stage_depths(total: int, stages: int | None) -> list[int]:
    """Which cascade depths to evaluate: the top layer, the whole model, and evenly between."""
    if stages is None or stages >= total:
        return list(range(1, total + 1))
    if stages <= 1:
        return [total]
    return sorted(
        {round(1 + i * (total - 1) / (stages - 1)) for i in range(stages)}
    )  # e.g. total 6, stages 3 -> [1, 4, 6]


def cascading_randomisation(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    explain: Explainer,
    reference: Tensor,
    *,
    stages: int | None = None,
    seed: int = 0,
    cache: dict[str, Tensor] | None = None,
) -> RandomisationResult:
    """Re-initialise a copy of `model` layer by layer from the top and compare the maps.

    The trained model is not modified; the copy is put in eval mode. The global random state
    is restored afterwards, so the check does not change the training that follows.

    Args:
        model: the trained classifier (read only).
        images: float tensor [N, C, H, W] on the model's device.
        targets: int64 tensor [N], the class each map explains.
        explain: computes maps [M, N, H, W] for a model, images and targets.
        reference: float tensor [M, N, H, W], `explain(model, images, targets)` of the trained
            model (passed in so it is not computed twice).
        stages: how many cascade depths to evaluate (the top layer alone and the whole model
            always among them when 2 or more); None evaluates every depth.
        seed: seeds the re-initialisation (the same seed gives the same random weights,
            which differ from those a model built after `torch.manual_seed(seed)` starts with).
        cache: maps of earlier calls with the same `explain`, keyed by a fingerprint of the
            randomised model's state and of the inputs; filled and used when given. Maps are
            a deterministic function of these, and once every layer is re-initialised the
            state no longer depends on training, so from the second epoch on the fully
            randomised model's maps come from the cache.

    Returns:
        `RandomisationResult`, empty (L = 0) when the model has no randomisable layer.

    Raises:
        ValueError: a randomised model produced NaN or infinite maps.
    """
    layers = randomisable_layers(model)
    depths = _stage_depths(len(layers), stages) if layers else []
    reference = reference.detach().cpu()
    methods, count = reference.shape[:2]
    stage_maps, stage_spearman, stage_ssim = [], [], []
    reference_unit = _unit_magnitude(reference.flatten(0, 1))
    if depths:
        copied = copy.deepcopy(model).eval()
        copied_layers = randomisable_layers(copied)
        used: list[str] = []
        with seeded(_SEED_OFFSET + seed, images.device):
            randomised = 0
            for depth in depths:
                while randomised < depth:
                    copied_layers[randomised][1].reset_parameters()
                    randomised += 1
                key = _fingerprint(copied, images, targets) if cache is not None else ""
                used.append(key)
                if cache is not None and key in cache:
                    maps = cache[key]
                else:
                    maps = explain(copied, images, targets).detach().cpu()
                    if cache is not None:
                        cache[key] = maps
                if not torch.isfinite(maps).all():
                    raise ValueError(
                        f"maps of the model randomised down to {layers[depth - 1][0]} "
                        "are not finite"
                    )
                stage_maps.append(maps)
                stage_spearman.append(
                    spearman(
                        reference.abs().flatten(0, 1),
                        maps.abs().flatten(0, 1),
                        ignore_joint_zeros=True,
                    )
                    .view(methods, count)
                    .mean(dim=1)
                )
                stage_ssim.append(
                    ssim(reference_unit, _unit_magnitude(maps.flatten(0, 1)))
                    .view(methods, count)
                    .mean(dim=1)
                )
        del copied
        if cache is not None:  # keep only this call's stages: the cache stays small
            for key in set(cache) - set(used):
                del cache[key]
    empty = torch.empty(0, methods)
    return RandomisationResult(
        layers=[layers[depth - 1][0] for depth in depths],
        depth=torch.tensor(depths, dtype=torch.long),
        total_layers=len(layers),
        spearman=torch.stack(stage_spearman) if depths else empty,
        ssim=torch.stack(stage_ssim) if depths else empty,
        maps=torch.stack(stage_maps) if depths else torch.empty(0, *reference.shape),
    )


def _fingerprint(model: nn.Module, images: Tensor, targets: Tensor) -> str:
    """SHA-1 of a model's state (names, dtypes, shapes, values) and of its inputs."""
    digest = hashlib.sha1()
    tensors = [*model.state_dict().items(), ("images", images), ("targets", targets)]
    for name, tensor in tensors:
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

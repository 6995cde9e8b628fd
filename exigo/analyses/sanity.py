r"""Model-randomisation sanity check: does an attribution map depend on what the model learned?

Adebayo, Gilmer, Muelly, Goodfellow, Hardt and Kim (2018), "Sanity Checks for Saliency Maps",
NeurIPS. The layers of a *copy* of the model are re-initialised and the maps recomputed. A map
that stays the same when the weights it should explain are destroyed is not explaining the
model; it might be an edge detector, or the image itself. Two variants, both from the paper
(their Fig. 2 and 4):

- **cascading**: from the output down, depth $k$ = the top $k$ layers re-initialised;
- **independent**: depth $k$ = only the $k$-th layer from the top re-initialised.

Layer $k$ gets the same random weights in both (it is re-initialised from the same seed,
whatever else is randomised, as Quantus' `MPRT` does).

Similarity between the trained model's map $a$ and the randomised model's map $\tilde a$ of one
image:

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

**Controls: how much similarity does the image alone explain?** A map that merely follows the
input keeps its layout whatever the weights, and passes a bare threshold easily (Binder et
al. 2023, "Shortcomings of Top-Down Randomization-Based Sanity Checks for Evaluations of Deep
Neural Network Explanations", CVPR). Two references, per method and image:

- the **image control**: $\rho(|a|, |x - x'|)$, the trained map against an "explanation" made
  of the image alone (its difference from the blank baseline $x'$: the ink, on MNIST);
- the **seed control**: $\rho(|\tilde a|, |\tilde a'|)$, the maps of two fully randomised
  models with different seeds: the similarity that image and architecture give any two
  weight settings.

The verdict (`randomisation_verdict`) compares the similarity after randomising every layer,
over several draws of the random weights, with the image control (floored at 0), image by
image (`excess_over_image`).

A layer is one module that owns parameters and has `reset_parameters()`; re-initialising it is
exactly what constructing it did. BatchNorm's `reset_parameters()` also resets its running
statistics to mean 0 and variance 1, so a randomised BatchNorm in eval mode is a finite
affine map (no NaN). The trained model is only read: its copy is made with `copy.deepcopy`.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exigo.analyses._bootstrap import Interval
from exigo.analyses._filters import gaussian_kernel
from exigo.analyses._random import seeded

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEPENDS",
    "FLAGGED",
    "INCONCLUSIVE",
    "Explainer",
    "RandomisationChecks",
    "excess_over_image",
    "image_control_map",
    "plot_randomisation",
    "randomisable_layers",
    "randomisation_checks",
    "randomisation_verdict",
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

    The Pearson correlation of the rows' ranks (`scipy.stats.rankdata`, all rows at once). A
    row that is constant (or has fewer than two values left) has no ranking; its correlation
    is reported as 0, not NaN.

    Args:
        first: float tensor [N, ...]; each row is flattened.
        second: float tensor of the same shape.
        ignore_joint_zeros: leave out the positions where both rows are exactly 0. Such zeros
            come from the input, not the model (Integrated Gradients gives exactly 0 wherever
            the image equals the baseline; occluding blank pixels changes nothing), and a
            large tie block of them makes any two maps of the same image correlate.

    Returns:
        Float tensor [N] in [-1, 1], on the CPU; NaN for a row with a NaN or infinite value.
    """
    # scipy.stats takes 0.5 s to import: only once a check runs, not at exigo's start-up
    from scipy.stats import rankdata

    if first.shape != second.shape:
        raise ValueError(f"shapes differ: {tuple(first.shape)} and {tuple(second.shape)}")
    # widened by numpy: torch's .double() of 60 maps took 12 ms on two busy cores (8 us on one)
    a_rows = first.detach().flatten(1).cpu().numpy().astype(np.float64)  # (N, D)
    b_rows = second.detach().flatten(1).cpu().numpy().astype(np.float64)
    kept = (a_rows != 0) | (b_rows != 0) if ignore_joint_zeros else np.ones(a_rows.shape, bool)
    # left-out positions are +inf while ranking: they rank last and leave the others' ranks
    # as if they were absent (30% faster than nan_policy="omit"), then count as 0
    a_ranks, b_ranks = (rankdata(np.where(kept, rows, np.inf), axis=1) for rows in (a_rows, b_rows))
    mean_rank = (kept.sum(axis=1, keepdims=True) + 1) / 2  # that of any n average ranks
    a_centred = np.where(kept, a_ranks - mean_rank, 0.0)
    b_centred = np.where(kept, b_ranks - mean_rank, 0.0)
    denominator = np.sqrt(np.square(a_centred).sum(axis=1) * np.square(b_centred).sum(axis=1))
    correlation = (a_centred * b_centred).sum(axis=1) / np.maximum(denominator, 1e-300)
    correlation = np.where(denominator > 0, correlation, 0.0)
    finite = np.isfinite(a_rows).all(axis=1) & np.isfinite(b_rows).all(axis=1)
    return torch.from_numpy(np.where(finite, correlation, np.nan)).float()


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
    rows, columns = profile.view(1, 1, 1, size), profile.view(1, 1, size, 1)

    def blur(x: Tensor) -> Tensor:  # the 2-D Gaussian as two 1-D passes (separable)
        return F.conv2d(F.conv2d(x, rows), columns)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mean_u, mean_v = blur(u), blur(v)
    var_u = blur(u * u) - mean_u.square()
    var_v = blur(v * v) - mean_v.square()
    covariance = blur(u * v) - mean_u * mean_v
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


def image_control_map(images: Tensor, baseline: Tensor) -> Tensor:
    r"""The image control's "explanation": each image's distance from the baseline.

    Args:
        images: float tensor [N, C, H, W].
        baseline: float tensor [1, C, H, W] or [N, C, H, W], the blank image.

    Returns:
        Float tensor [N, H, W], $\sum_c |x_c - x'_c|$, on the CPU (0 where the image is blank).
    """
    return (images.detach() - baseline.to(images)).abs().sum(dim=1).float().cpu()


@dataclass(frozen=True)
class RandomisationChecks:
    """How each method's maps change as the model's layers are randomised, image by image.

    Depth k (1-based) means the top k layers (cascade) or only the k-th layer from the top
    (independent); entry k - 1 along the first axis.

    Attributes:
        layers: names of the randomisable layers, top first, length L.
        cascade_spearman: float tensor [L, M, N], Spearman of |map| with the trained model's
            (the random weights of the first draw).
        full_spearman: float tensor [D, M, N], the same after randomising every layer, for
            each of D independent draws of the random weights (draw 0 is the cascade's).
        ssim: float tensor [M, N], SSIM of the scaled |map| after randomising every layer
            with the trained one's, mean over the draws (NaN when the model has no
            randomisable layer).
        independent_spearman: float tensor [L, M, N]; empty [0, M, N] when not computed.
        image_control: float tensor [M, N], Spearman of the trained |map| with the image's
            distance from the baseline.
        seed_control: float tensor [M, N], Spearman between the |maps| of two fully
            randomised models with different seeds (mean over consecutive draws).
        errors: method key -> why its maps of some randomised model are unusable (its rows
            are NaN from that depth on).
        explained: model passes of `explain` run (the others came from the cache).
    """

    layers: list[str]
    cascade_spearman: Tensor
    full_spearman: Tensor
    ssim: Tensor
    independent_spearman: Tensor
    image_control: Tensor
    seed_control: Tensor
    errors: dict[str, str]
    explained: int = 0

    @property
    def total_layers(self) -> int:
        """L, the number of randomisable layers (0: nothing was checked)."""
        return len(self.layers)


def _random_state(
    name: str,
    layer: nn.Module,
    seed: int,
    device: torch.device,
    cache: dict[Any, Any] | None,
) -> dict[str, Tensor]:
    """The state of `layer` re-initialised from `seed` (a copy; `layer` is not changed)."""
    key = ("layer", name, type(layer).__qualname__, seed, *_shapes(layer))
    if cache is not None and key in cache:
        return cache[key]
    fresh = copy.deepcopy(layer)
    # reset_parameters() takes no generator: nn.init draws from torch's global one, so the
    # draw happens inside `seeded`, which restores the global state after it.
    with seeded(_SEED_OFFSET + seed, device):
        fresh.reset_parameters()
    state = {name: value.detach().clone() for name, value in fresh.state_dict().items()}
    if cache is not None:
        cache[key] = state
    return state


def _shapes(layer: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((name, tuple(value.shape)) for name, value in layer.state_dict().items())


def randomisation_checks(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    explain: Explainer,
    reference: Tensor,
    *,
    names: Sequence[str],
    image_maps: Tensor | None = None,
    seed: int = 0,
    draws: int = 5,
    independent: bool = True,
    ignore_joint_zeros: bool = True,
    cache: dict[Any, Any] | None = None,
) -> RandomisationChecks:
    """Cascading and independent randomisation of a copy of `model`, with both controls.

    The trained model is not modified; the copies are put in eval mode.

    Args:
        model: the trained classifier (read only).
        images: float tensor [N, C, H, W] on the model's device.
        targets: int64 tensor [N], the class each map explains.
        explain: computes maps [M, N, H, W] for a model, images and targets (a method that
            fails may give NaN rows: they are reported in `errors`).
        reference: float tensor [M, N, H, W], `explain(model, images, targets)` of the trained
            model (passed in so it is not computed twice).
        names: the M method keys, for the error messages.
        image_maps: float tensor [N, H, W], the image control's maps
            (`image_control_map`); None leaves the image control at NaN.
        seed: seeds the re-initialisation (the same seed gives the same random weights,
            which differ from those a model built after `torch.manual_seed(seed)` starts with).
        draws: D, independent draws of the random weights of the full randomisation (seeds
            `seed`, `seed + 1`, ...): the similarity of one draw varies a lot from draw to
            draw for some methods (Grad-CAM on MNIST: -0.25 to 0.24 over 6 draws), so the
            verdict uses all of them; at least 2 (the seed control compares two).
        independent: also randomise each layer alone.
        ignore_joint_zeros: leave pixels where both maps are 0 out of the Spearman
            correlations (False: every pixel, as Quantus' `MPRT` does).
        cache: random layer states and maps of earlier calls, keyed by a fingerprint of the
            randomised model's state and of the inputs; filled and used when given. Maps are
            a deterministic function of these, and once every layer is re-initialised the
            state no longer depends on training, so from the second epoch on the fully
            randomised models' maps (every draw) come from the cache.

    Returns:
        `RandomisationChecks`; L = 0 (every tensor empty along depth) when the model has no
        randomisable layer.
    """
    if draws < 2:
        raise ValueError(f"draws must be at least 2 (the seed control compares two), got {draws}")
    layers = randomisable_layers(model)
    reference = reference.detach().cpu()
    methods, count = reference.shape[:2]
    nan = torch.full((methods, count), float("nan"))
    errors: dict[str, str] = {}
    used: set[Any] = set()
    explained = 0

    def maps_of(randomised: nn.Module, what: str) -> Tensor:
        nonlocal explained
        key = _fingerprint(randomised, images, targets) if cache is not None else None
        used.add(key)
        if cache is not None and key in cache:
            return cache[key]
        maps = explain(randomised, images, targets).detach().cpu()
        explained += 1
        if cache is not None:
            cache[key] = maps
        for index, name in enumerate(names):
            if name not in errors and not torch.isfinite(maps[index]).all():
                errors[name] = f"its maps of the model with {what} are not finite"
        return maps

    def compare(maps: Tensor) -> Tensor:  # (M, N)
        return spearman(
            reference.abs().flatten(0, 1),
            maps.abs().flatten(0, 1),
            ignore_joint_zeros=ignore_joint_zeros,
        ).view(methods, count)

    cascade_spearman: list[Tensor] = []
    independent_spearman: list[Tensor] = []
    full_spearman: list[Tensor] = []
    cascade_ssim = nan.clone()
    image_control = nan.clone()
    seed_control = nan.clone()
    if image_maps is not None:
        image_control = spearman(
            reference.abs().flatten(0, 1),
            image_maps.abs()[None].expand(methods, -1, -1, -1).flatten(0, 1),
            ignore_joint_zeros=ignore_joint_zeros,
        ).view(methods, count)
    if layers:
        reference_unit = _unit_magnitude(reference.flatten(0, 1))
        copied = copy.deepcopy(model).eval()
        copied_layers = [module for _, module in randomisable_layers(copied)]
        trained_states = [
            {k: v.detach().clone() for k, v in module.state_dict().items()}
            for module in copied_layers
        ]
        states = [
            _random_state(name, module, seed, images.device, cache)
            for (name, _), module in zip(layers, copied_layers, strict=True)
        ]
        full = reference
        for depth, (name, _) in enumerate(layers, start=1):
            copied_layers[depth - 1].load_state_dict(states[depth - 1])
            full = maps_of(copied, f"the layers down to {name} randomised")
            cascade_spearman.append(compare(full))
        if independent:
            for module, state in zip(copied_layers, trained_states, strict=True):
                module.load_state_dict(state)  # the trained model again
            for depth, (name, _) in enumerate(layers, start=1):
                module = copied_layers[depth - 1]
                module.load_state_dict(states[depth - 1])
                single = maps_of(copied, f"only {name} randomised")
                independent_spearman.append(compare(single))
                module.load_state_dict(trained_states[depth - 1])
        fulls = [full]
        for draw in range(1, draws):
            for (name, _), module in zip(layers, copied_layers, strict=True):
                module.load_state_dict(
                    _random_state(name, module, seed + draw, images.device, cache)
                )
            fulls.append(maps_of(copied, f"every layer randomised (draw {draw + 1})"))
        full_spearman = [compare(maps) for maps in fulls]
        cascade_ssim = (
            torch.stack(
                [ssim(reference_unit, _unit_magnitude(maps.flatten(0, 1))) for maps in fulls]
            )
            .mean(dim=0)
            .view(methods, count)
        )
        seed_control = torch.stack(
            [
                spearman(
                    first.abs().flatten(0, 1),
                    second.abs().flatten(0, 1),
                    ignore_joint_zeros=ignore_joint_zeros,
                ).view(methods, count)
                for first, second in itertools.pairwise(fulls)
            ]
        ).mean(dim=0)
        del copied
    if cache is not None:  # keep this call's maps and every random layer state: small
        for key in [key for key in cache if isinstance(key, str) and key not in used]:
            del cache[key]
    empty = torch.empty(0, methods, count)
    return RandomisationChecks(
        layers=[name for name, _ in layers],
        cascade_spearman=torch.stack(cascade_spearman) if cascade_spearman else empty,
        full_spearman=torch.stack(full_spearman) if full_spearman else empty,
        ssim=cascade_ssim,
        independent_spearman=(torch.stack(independent_spearman) if independent_spearman else empty),
        image_control=image_control,
        seed_control=seed_control,
        errors=errors,
        explained=explained,
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


#: The verdicts of `randomisation_verdict`, as recorded in `sanity/verdict/<key>`.
FLAGGED, INCONCLUSIVE, DEPENDS = 1.0, 0.0, -1.0


def excess_over_image(checks: RandomisationChecks) -> Tensor:
    r"""How much more the randomised maps resemble the trained ones than the image does.

    $d_{kn} = \rho_{kn}(a, \tilde a) - \max(\rho_n(a, |x - x'|), 0)$: draw k's Spearman
    after randomising every layer, minus the image control, which counts as 0 when negative
    (an image that anti-correlates with the map explains no similarity), per draw and image.

    Args:
        checks: the randomisation checks of M methods on N images with D draws.

    Returns:
        Float tensor [M, D, N].
    """
    floor = checks.image_control.clamp_min(0)  # NaN stays NaN
    return (checks.full_spearman - floor[None]).transpose(0, 1)


def randomisation_verdict(excess: Interval) -> Tensor:
    """Each method's verdict from the interval of its excess similarity over the image control.

    The excess (`excess_over_image`), averaged over the draws of the random weights and the
    images, with an interval that resamples both. Its interval above 0: the randomised
    model's maps resemble the trained ones more than the image does, so what they show does
    not come from the weights (`FLAGGED`). Below 0: randomising the weights took the maps
    further from the trained ones than the image alone is (`DEPENDS` on the weights).
    Otherwise `INCONCLUSIVE`, including a zero-width interval at 0 (a map that is the control
    itself).

    Args:
        excess: `Interval` of tensors [M], the mean excess with its bootstrap interval.

    Returns:
        Float tensor [M] of `FLAGGED` (1), `INCONCLUSIVE` (0) or `DEPENDS` (-1); NaN where the
        interval is NaN.
    """
    verdict = torch.where(
        excess.low > 0,
        FLAGGED,
        torch.where(excess.high < 0, DEPENDS, INCONCLUSIVE),
    )
    return torch.where(excess.low.isnan() | excess.high.isnan(), float("nan"), verdict)


def plot_randomisation(
    keys: Sequence[str],
    labels: Mapping[str, str],
    layers: Sequence[str],
    cascade: Interval,
    independent: Interval | None,
    full: Interval,
    draws: int,
    image_control: Interval,
    seed_control: Interval,
    excess: Interval,
    verdicts: Sequence[str],
    title: str,
) -> Figure:
    """One panel per method: its cascade and independent curves, and the two controls.

    Args:
        keys: the M methods' keys, in panel order.
        labels: key -> display name.
        layers: the L randomisable layers' names, top first.
        cascade: `Interval` of tensors [L, M], Spearman after randomising the top k layers.
        independent: `Interval` [L, M], after randomising the k-th layer alone; or None.
        full: `Interval` [M], after randomising every layer, over all draws and images.
        draws: how many draws of the random weights `full` averages.
        image_control: `Interval` [M], Spearman of the trained map with the image.
        seed_control: `Interval` [M], Spearman between two fully randomised models' maps.
        excess: `Interval` [M], the mean of (`full` - the image control, floored at 0).
        verdicts: M words: `FLAGGED`, `depends on the weights` or `inconclusive`.
        title: the figure's title.

    Returns:
        A matplotlib Figure.
    """
    from matplotlib.figure import Figure

    columns = min(3, len(keys)) or 1
    rows = -(-len(keys) // columns) or 1
    figure = Figure(figsize=(5.2 * columns, 3.9 * rows + 1.0))
    figure.subplots_adjust(
        left=0.06, right=0.98, bottom=0.12 + 0.1 / rows, top=0.9, wspace=0.22, hspace=0.55
    )
    grid = figure.subplots(rows, columns, squeeze=False)
    depth = list(range(len(layers) + 1))
    ticks = ["none", *[f"{k}\n{name}" for k, name in enumerate(layers, start=1)]]
    colours = {"FLAGGED": "red", "inconclusive": "darkorange"}
    for index, key in enumerate(keys):
        axes = grid[index // columns, index % columns]
        colour = f"C{index}"
        axes.axhspan(
            float(image_control.low[index]),
            float(image_control.high[index]),
            color="0.5",
            alpha=0.25,
            linewidth=0,
        )
        axes.axhline(
            float(image_control.mean[index]),
            color="0.4",
            linewidth=1.2,
            label=f"image alone {image_control[index].text()}",
        )
        axes.axhspan(
            float(seed_control.low[index]),
            float(seed_control.high[index]),
            color="sienna",
            alpha=0.15,
            linewidth=0,
        )
        axes.axhline(
            float(seed_control.mean[index]),
            color="sienna",
            linestyle=":",
            linewidth=1.2,
            label=f"two random models {seed_control[index].text()}",
        )
        axes.plot(
            depth,
            [1.0, *cascade.mean[:, index].tolist()],
            marker="o",
            color=colour,
            label="cascade: top k layers",
        )
        axes.fill_between(
            depth,
            [1.0, *cascade.low[:, index].tolist()],
            [1.0, *cascade.high[:, index].tolist()],
            color=colour,
            alpha=0.2,
            linewidth=0,
        )
        if independent is not None:
            axes.plot(
                depth[1:],
                independent.mean[:, index].tolist(),
                marker="s",
                markersize=3,
                linestyle="--",
                color=colour,
                alpha=0.8,
                label="independent: layer k alone",
            )
            axes.fill_between(
                depth[1:],
                independent.low[:, index].tolist(),
                independent.high[:, index].tolist(),
                color=colour,
                alpha=0.1,
                linewidth=0,
            )
        last = len(layers) + 0.25
        axes.errorbar(
            [last],
            [float(full.mean[index])],
            yerr=[
                [float(full.mean[index] - full.low[index])],
                [float(full.high[index] - full.mean[index])],
            ],
            marker="D",
            markersize=5,
            color="black",
            capsize=3,
            label=f"every layer, {draws} draws {full[index].text()}",
        )
        verdict = verdicts[index]
        axes.set_title(
            f"{labels.get(key, key)}: {verdict}\nafter all {len(layers)} layers "
            f"- image: {excess[index].text()}",
            fontsize=9,
            color=colours.get(verdict, "darkgreen"),
        )
        axes.set_xticks(depth, ticks, fontsize=6)
        axes.set_xlim(-0.3, len(layers) + 0.5)
        axes.set_ylim(-0.25, 1.5)
        axes.set_yticks([-0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
        axes.grid(alpha=0.3)
        axes.set_ylabel("|map| Spearman with trained", fontsize=8)
        axes.legend(fontsize=6, loc="upper center", ncol=2, framealpha=0.9)
    for index in range(len(keys), rows * columns):
        grid[index // columns, index % columns].set_visible(False)
    figure.suptitle(title, fontsize=11)
    figure.text(
        0.5,
        0.012,
        "x: layers re-initialised, from the top (k = 1 is the output layer); curves: one draw of "
        "the random weights; black diamond: every layer, mean over all draws.\nRule, per "
        "method: d = Spearman after randomising every layer - max(Spearman of the trained map "
        "with the image itself, 0), image by image and draw by draw.\nFLAGGED when the 95% "
        "bootstrap interval (images and draws resampled) of the mean d lies above 0 "
        "(randomised maps resemble the trained ones more than the image does: they do not "
        "depend on the weights);\ndepends on the weights when it lies below 0; inconclusive "
        "otherwise.",
        ha="center",
        fontsize=7.5,
        color="0.25",
    )
    return figure

r"""Six attribution methods compared every epoch, and checked: can their maps be trusted?

With $f_c$ the logit of the true class $c$, $x$ the image and $x'$ the blank image (zero
intensity, normalised like the data; zeros when the normalisation is unknown):

- Saliency (Simonyan et al. 2013): $a = \lvert \nabla_x f_c(x) \rvert$
- Input × Gradient (Shrikumar et al. 2016): $a = x \odot \nabla_x f_c(x)$
- Integrated Gradients (Sundararajan et al. 2017):
  $a = (x - x') \odot \int_0^1 \nabla_x f_c(x' + \alpha (x - x')) \, d\alpha$
- SmoothGrad (Smilkov et al. 2017):
  $a = \frac{1}{n} \sum_{i=1}^{n} \lvert \nabla_x f_c(x + \varepsilon_i) \rvert$,
  $\varepsilon_i \sim \mathcal{N}(0, \sigma^2 I)$
- Occlusion (Zeiler & Fergus 2014): for each pixel, the mean over the patches $w$ covering it
  of $f_c(x) - f_c(x_{w \leftarrow x'})$, the image with patch $w$ set to the baseline
- Grad-CAM (Selvaraju et al. 2017): $a = \mathrm{ReLU}(\sum_k \alpha_k A^k)$,
  $\alpha_k = \frac{1}{hw} \sum_{ij} \partial f_c / \partial A^k_{ij}$, upsampled

$A^k$ are the channels of the last `nn.Conv2d`'s output (found generically), upsampled
bilinearly to the image size. The methods are Captum's (`captum.attr`); maps are summed over
colour channels to one value per pixel. SmoothGrad's noise is drawn from a fixed seed, so the
same image gets the same noise every epoch and every randomised model: drift and the sanity
check measure the model, not the noise.

`AttributionAnalysis` draws the maps of the display probes, and checks every method on a
separate **check set** (100 held-out images by default, stratified by class, the same every
epoch), each number a mean over the check images with a 95% bootstrap interval
(`exigo.analyses._bootstrap`):

- **faithfulness**: deletion and insertion curves (`exigo.analyses.faithfulness`, Petsiuk et
  al. 2018) and ROAD (`exigo.analyses.road`, Rong et al. 2022), each against a random pixel
  order with a paired Wilcoxon signed-rank test;
- **randomisation**: cascading and independent model randomisation (`exigo.analyses.sanity`,
  Adebayo et al. 2018) against the image control. The verdict, per method, on the
  difference $d_{kn} = \rho_{kn}(a, \tilde a) - \max(\rho_n(a, |x - x'|), 0)$ between image
  $n$'s rank correlation with the map of the model fully randomised by draw $k$ of the
  random weights and with the image itself: **flagged** (the maps do not depend on the
  weights) when the interval of the mean $d$ (draws and images resampled) lies above 0,
  **depends on the weights** when it lies below 0, **inconclusive** otherwise;
- **drift** and the stability of the faithfulness ranking (`exigo.analyses.drift`).
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from exigo._modes import evaluation_mode
from exigo.analyses._bootstrap import Bootstrap, Interval
from exigo.analyses.drift import (
    faithfulness_score,
    plot_drift,
    ranking_stability,
    settled_after,
)
from exigo.analyses.faithfulness import (
    FaithfulnessCurves,
    better_than_random,
    deletion_insertion,
    plot_faithfulness,
)
from exigo.analyses.projection import stratified_indices
from exigo.analyses.road import RoadCurves, road_curves
from exigo.analyses.sanity import (
    DEPENDS,
    FLAGGED,
    INCONCLUSIVE,
    RandomisationChecks,
    excess_over_image,
    image_control_map,
    plot_randomisation,
    randomisation_checks,
    randomisation_verdict,
    spearman,
)
from exigo.analysis import Analysis, EpochContext, FigureInfo
from exigo.data import blank_image, dataset_targets, gather
from exigo.figures.tiles import TileBlock, TileRow, tile_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


__all__ = [
    "METHOD_LABELS",
    "AttributionAnalysis",
    "AttributionMethod",
    "AttributionSettings",
    "attribution_maps",
    "channels_last_copy",
    "choose_check_set",
    "default_methods",
    "grad_cam",
    "input_x_gradient",
    "integrated_gradients",
    "last_conv_layer",
    "occlusion",
    "plot_attributions",
    "saliency",
    "smoothgrad",
]

#: `method(model, images [N, C, H, W], targets [N]) -> attributions [N, C or 1, H, W]`.
AttributionMethod = Callable[[nn.Module, Tensor, Tensor], Tensor]

#: Display name of each method key (keys name the metrics: `faithfulness/deletion_auc/<key>`).
METHOD_LABELS = {
    "saliency": "Saliency",
    "input_x_gradient": "Input × Gradient",
    "integrated_gradients": "Integrated Gradients",
    "smoothgrad": "SmoothGrad",
    "occlusion": "Occlusion",
    "grad_cam": "Grad-CAM",
    "random": "random order",
}


@dataclass(frozen=True)
class AttributionSettings:
    """Costs, sizes and thresholds of the attribution analysis."""

    check_size: int = 100
    """Held-out images the checks run on (stratified by class, the same every epoch)."""

    ig_steps: int = 16
    """Gauss-Legendre points of the Integrated Gradients path integral."""

    smoothgrad_samples: int = 16
    """Noisy copies per image."""

    smoothgrad_noise: float = 0.15
    """Noise sigma as a fraction of the images' value range."""

    occlusion_window: int = 7
    """Side of the square occluding patch, pixels."""

    occlusion_stride: int = 3
    """Step between patches, pixels (7 + 7 * 3 = 28 covers MNIST)."""

    batch_size: int = 256
    """Images per forward/backward pass inside every method and curve."""

    deletion_steps: int = 56
    """Steps k of the deletion/insertion curves (k + 1 points; 56 removes 14 of 784 pixels
    per step, so Quantus' `PixelFlipping` with `features_in_step=14` has the same points)."""

    road_fractions: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    """Removed fractions of the ROAD curves (the paper's 10% steps)."""

    road_noise: float = 0.01
    """Standard deviation of ROAD's imputation noise, in the model's input units."""

    independent: bool = True
    """Also randomise each layer alone (Adebayo et al.'s independent randomisation)."""

    randomisation_draws: int = 5
    """Independent draws of the random weights behind the verdict (every layer randomised;
    their maps are computed in the first epoch only, then cached)."""

    bootstrap_resamples: int = 2000
    """Resamples of the check images behind every interval."""

    confidence: float = 0.95
    """Coverage of the intervals."""

    significance: float = 0.05
    """Family-wise level of the better-than-random tests (Bonferroni over the methods)."""

    settled_threshold: float = 0.8
    """A method's maps have settled once its drift stays at or above this."""


def choose_check_set(
    targets: Tensor, size: int, seed: int, exclude: Tensor | None = None
) -> Tensor:
    """The check set: `size` held-out positions, stratified by class, seeded.

    Args:
        targets: int64 tensor [N], the held-out labels.
        size: images wanted.
        seed: seed of the draw within each class (`projection.stratified_indices`).
        exclude: int64 tensor of positions to leave out (the display probes), when enough
            others remain.

    Returns:
        int64 tensor [min(size, candidates)], ascending positions in `targets`.
    """
    candidates = torch.arange(targets.numel())
    if exclude is not None and exclude.numel():
        keep = torch.ones(targets.numel(), dtype=torch.bool)
        keep[exclude.cpu()] = False
        candidates = candidates[keep]
    chosen = stratified_indices(targets[candidates], size, seed)
    return candidates[chosen]


def _with_gradient(images: Tensor) -> Tensor:
    # A leaf that requires grad: Captum then computes input gradients without warning.
    return images.detach().clone().requires_grad_(True)


def saliency(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    r"""Gradient magnitude $|\nabla_x f_c(x)|$ (Simonyan et al. 2013).

    Args:
        model: classifier mapping [N, C, H, W] to logits [N, K], in eval mode.
        images: float tensor [N, C, H, W] as the model takes them.
        targets: int64 tensor [N], the class whose logit is explained.

    Returns:
        Float tensor [N, C, H, W], non-negative.
    """
    from captum.attr import Saliency

    return Saliency(model).attribute(_with_gradient(images), target=targets, abs=True).detach()


def input_x_gradient(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    r"""Input times gradient, $x \odot \nabla_x f_c(x)$ (Shrikumar et al. 2016), signed.

    Args:
        model: classifier mapping [N, C, H, W] to logits [N, K], in eval mode.
        images: float tensor [N, C, H, W] as the model takes them.
        targets: int64 tensor [N], the class whose logit is explained.

    Returns:
        Float tensor [N, C, H, W].
    """
    from captum.attr import InputXGradient

    return InputXGradient(model).attribute(_with_gradient(images), target=targets).detach()


def integrated_gradients(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    baseline: Tensor,
    steps: int = 16,
    batch_size: int = 256,
) -> Tensor:
    r"""Integrated Gradients from `baseline` to the image (Sundararajan et al. 2017).

    Completeness: the map sums to $f_c(x) - f_c(x')$ up to the quadrature error of `steps`
    Gauss-Legendre points.

    Args:
        model: classifier, in eval mode.
        images: float tensor [N, C, H, W].
        targets: int64 tensor [N].
        baseline: float tensor [1, C, H, W] or [N, C, H, W], the path's start $x'$.
        steps: points of the path integral.
        batch_size: path points x images per forward/backward pass (at least N).

    Returns:
        Float tensor [N, C, H, W], signed.
    """
    from captum.attr import IntegratedGradients

    return (
        IntegratedGradients(model)
        .attribute(
            images,
            baselines=baseline.to(images),
            target=targets,
            n_steps=steps,
            internal_batch_size=max(batch_size, images.shape[0]),  # Captum's minimum
        )
        .detach()
    )


def smoothgrad(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    samples: int = 16,
    noise: float = 0.15,
    value_range: float | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> Tensor:
    r"""SmoothGrad of the gradient magnitude (Smilkov et al. 2017).

    $\sigma$ = `noise` times the value range of the data. The noise comes from a generator
    seeded with `seed`, so the same call gives the same map, and torch's global random state
    is neither read nor changed (Captum's `NoiseTunnel` draws from it, which a run training on
    another thread would see). The draws are shared out over the images of the call, so an
    image's map also depends on which images are attributed with it; `attribution_maps`
    always passes the same chunks.

    Args:
        model: classifier, in eval mode.
        images: float tensor [N, C, H, W].
        targets: int64 tensor [N].
        samples: noisy copies per image.
        noise: sigma as a fraction of `value_range` (the paper: 10-20%).
        value_range: max - min of the data; default: that of `images`.
        batch_size: noisy images per forward/backward pass.
        seed: seed of the noise.

    Returns:
        Float tensor [N, C, H, W], non-negative.
    """
    from captum.attr import Saliency

    if value_range is None:
        value_range = float(images.max() - images.min())
    sigma = noise * value_range
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randn((samples, *images.shape), generator=generator)
    noisy = (images.detach()[None] + draws.to(images) * sigma).flatten(0, 1)  # (S * N, C, H, W)
    labels = targets.repeat(samples)
    explainer = Saliency(model)
    gradients = [
        explainer.attribute(_with_gradient(chunk), target=chunk_labels, abs=True).detach()
        for chunk, chunk_labels in zip(
            noisy.split(batch_size), labels.split(batch_size), strict=True
        )
    ]
    return torch.cat(gradients).view(samples, *images.shape).mean(dim=0)


def occlusion(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    baseline: Tensor,
    window: int = 7,
    stride: int = 3,
    batch_size: int = 256,
) -> Tensor:
    r"""Drop of $f_c$ when a square patch is set to the baseline (Zeiler & Fergus 2014).

    Each pixel gets the mean drop over the patches that cover it; pixels no patch reaches (when
    `window` and `stride` do not tile the image) get 0.

    Args:
        model: classifier, in eval mode.
        images: float tensor [N, C, H, W].
        targets: int64 tensor [N].
        baseline: float tensor [1, C, H, W], what an occluded pixel becomes.
        window: side of the patch in pixels (clipped to the image).
        stride: step between patches in pixels.
        batch_size: occluded images per forward pass.

    Returns:
        Float tensor [N, C, H, W], signed (positive: occluding the patch lowers $f_c$).
    """
    from captum.attr import Occlusion

    channels, height, width = images.shape[1:]
    side = (channels, min(window, height), min(window, width))
    with torch.no_grad():
        return Occlusion(model).attribute(
            images,
            sliding_window_shapes=side,
            strides=(channels, stride, stride),
            baselines=baseline.to(images),
            target=targets,
            perturbations_per_eval=max(1, batch_size // images.shape[0]),
        )


def last_conv_layer(model: nn.Module) -> nn.Conv2d | None:
    """The last `nn.Conv2d` registered in `model`: the layer Grad-CAM explains.

    Args:
        model: any module.

    Returns:
        The convolution, or None when `model` has none (Grad-CAM is then skipped).
    """
    convolutions = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    return convolutions[-1] if convolutions else None


def grad_cam(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    r"""Grad-CAM on the last `nn.Conv2d`, upsampled bilinearly (Selvaraju et al. 2017).

    Args:
        model: classifier with at least one `nn.Conv2d`, in eval mode.
        images: float tensor [N, C, H, W].
        targets: int64 tensor [N].

    Returns:
        Float tensor [N, 1, H, W], non-negative.

    Raises:
        ValueError: the model has no `nn.Conv2d`.
    """
    from captum.attr import LayerAttribution, LayerGradCam

    layer = last_conv_layer(model)
    if layer is None:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer for Grad-CAM")
    cam = LayerGradCam(model, layer).attribute(
        _with_gradient(images), target=targets, relu_attributions=True
    )  # (N, 1, h, w)
    return LayerAttribution.interpolate(
        cam.detach(), tuple(images.shape[-2:]), interpolate_mode="bilinear"
    )


def default_methods(
    baseline: Tensor,
    settings: AttributionSettings | None = None,
    *,
    seed: int = 0,
    value_range: float | None = None,
    grad_cam_layer: bool = True,
) -> dict[str, AttributionMethod]:
    """The six methods with their settings bound, keyed as in `METHOD_LABELS`, in figure order.

    Args:
        baseline: float tensor [1, C, H, W], the blank image (`exigo.data.blank_image`:
            Integrated Gradients' start and Occlusion's patch content).
        settings: costs of the methods; default `AttributionSettings()`.
        seed: seed of SmoothGrad's noise.
        value_range: max - min of the data, the unit of SmoothGrad's noise; default: the
            range of the images of each call.
        grad_cam_layer: include Grad-CAM (False for models without `nn.Conv2d`).

    Returns:
        `{key: method}`; every method has the call shape `(model, images, targets) -> maps`.
    """
    settings = settings or AttributionSettings()
    methods: dict[str, AttributionMethod] = {
        "saliency": saliency,
        "input_x_gradient": input_x_gradient,
        "integrated_gradients": functools.partial(
            integrated_gradients,
            baseline=baseline,
            steps=settings.ig_steps,
            batch_size=settings.batch_size,
        ),
        "smoothgrad": functools.partial(
            smoothgrad,
            samples=settings.smoothgrad_samples,
            noise=settings.smoothgrad_noise,
            value_range=value_range,
            batch_size=settings.batch_size,
            seed=seed,
        ),
        "occlusion": functools.partial(
            occlusion,
            baseline=baseline,
            window=settings.occlusion_window,
            stride=settings.occlusion_stride,
            batch_size=settings.batch_size,
        ),
    }
    if grad_cam_layer:
        methods["grad_cam"] = grad_cam
    return methods


def attribution_maps(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    methods: Mapping[str, AttributionMethod],
    *,
    batch_size: int = 256,
    errors: dict[str, str] | None = None,
) -> Tensor:
    """Every method's map of every image, channels summed.

    The model runs in eval mode (each module's mode is restored afterwards); only input
    gradients are taken, so its parameters' `.grad` are not touched.

    Args:
        model: classifier mapping [N, C, H, W] to logits [N, K].
        images: float tensor [N, C, H, W] on the model's device.
        targets: int64 tensor [N], the class each map explains.
        methods: `{key: method}`, e.g. `default_methods(...)`.
        batch_size: images handed to a method at once (each method batches its own inner
            work with its settings' batch size).
        errors: when given, a method that raises on a batch of images does not stop the
            others: its maps are NaN and `errors[key]` says what happened (its first
            failure). When None, the exception propagates.

    Returns:
        Float tensor [M, N, H, W] on the CPU, in the order of `methods`.
    """
    height, width = images.shape[-2:]
    per_method = []
    with evaluation_mode(model):
        for key, method in methods.items():
            parts = []
            for start in range(0, images.shape[0], batch_size):
                image_batch = images[start : start + batch_size]
                try:
                    part = method(model, image_batch, targets[start : start + batch_size])
                    parts.append(part.sum(dim=1).float().cpu())
                except Exception as error:  # reported through `errors`
                    if errors is None:
                        raise
                    last = start + image_batch.shape[0] - 1
                    errors.setdefault(
                        key, f"{type(error).__name__}: {error} (check images {start}-{last})"
                    )
                    parts.append(torch.full((image_batch.shape[0], height, width), float("nan")))
            per_method.append(torch.cat(parts))
    return torch.stack(per_method)


def _two_lines(label: str) -> str:
    """Break a long row label at its middle space so it fits beside one image."""
    if len(label) <= 10 or " " not in label:
        return label
    spaces = [i for i, char in enumerate(label) if char == " "]
    middle = min(spaces, key=lambda i: abs(i - len(label) / 2))
    return label[:middle] + "\n" + label[middle + 1 :]


def plot_attributions(
    pixels: Tensor,
    maps: Tensor,
    scales: Tensor,
    names: Sequence[str],
    labels: Sequence[int],
    probabilities: Sequence[float],
    class_names: Sequence[str],
    title: str,
) -> Figure:
    """One row per method, one column per probe image, one colour bar per row.

    Drawn as one picture (`exigo.figures.tiles`): separate axes for 70 maps and 6 colour bars would
    take most of the analysis' time to render. A grey line over each map marks the ink.

    Args:
        pixels: float tensor [N, C, H, W] in [0, 1], the images as seen.
        maps: float tensor [M, N, H, W], signed attributions.
        scales: float tensor [M], each row's colour limit (the map is drawn on [-s, s]).
        names: M method keys (`METHOD_LABELS` gives the row titles).
        labels: N true class indices.
        probabilities: N true-class probabilities of the model.
        class_names: display name per class.
        title: the figure's title.

    Returns:
        A matplotlib Figure.
    """
    display = pixels.detach().float().cpu().permute(0, 2, 3, 1).clamp(0, 1).numpy()
    ink = display.mean(axis=-1)  # (N, H, W)
    tiles = display[..., 0] if display.shape[-1] == 1 else display
    values = maps.detach().float().cpu().numpy()
    rows = [TileRow("image", tiles)]
    for name, method_maps, scale in zip(names, values, scales.tolist(), strict=True):
        limit = float(scale) or 1.0
        rows.append(
            TileRow(
                _two_lines(METHOD_LABELS.get(name, name)),
                method_maps,
                "RdBu_r",
                (-limit, limit),
                bar=True,
                outline=ink,
            )
        )
    block = TileBlock(
        rows,
        column_labels=[
            f"{class_names[label]}  p={probability:.2f}"
            for label, probability in zip(labels, probabilities, strict=True)
        ],
    )
    return tile_figure(
        [block],
        title,
        "p: the model's probability of the true class.  Red raises the true class's logit, "
        "blue lowers it.  Grey line: outline of the ink.\nEach row's colour scale is "
        "± the largest |attribution| of that method in any epoch so far, so later epochs "
        "compare with earlier ones.",
    )


def channels_last_copy(model: nn.Module, sample: Tensor) -> nn.Module | None:
    """A copy of `model` in channels-last memory format, for the checks' many CPU passes.

    oneDNN's convolutions take that layout natively: on a 2-core CPU the checks' maps and
    curves of the default MNIST CNN ran 1.4-1.6 times faster with it (logits equal to 1e-6).
    Only on the CPU (CUDA's float32 convolutions gain little), and only when the copy gives
    the model's logits on `sample` (a model that calls `.view` on a convolution's output
    cannot take the layout).

    Args:
        model: the trained classifier (not modified).
        sample: float tensor [B, C, H, W], a few of the images it will see.

    Returns:
        The copy, in eval mode; None when the device is not the CPU or the copy fails.
    """
    if sample.device.type != "cpu" or sample.ndim != 4:
        return None
    copied = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    with torch.no_grad(), evaluation_mode(model):
        try:
            same = torch.allclose(copied(sample), model(sample), rtol=1e-4, atol=1e-5)
        except RuntimeError:  # e.g. `.view` of a non-contiguous activation
            same = False
    return copied if same else None


def _interval_metrics(metrics: dict[str, float], prefix: str, interval: Interval) -> None:
    metrics[f"{prefix}/mean"] = float(interval.mean)
    metrics[f"{prefix}/ci_low"] = float(interval.low)
    metrics[f"{prefix}/ci_high"] = float(interval.high)


def _p_text(p: float) -> str:
    return f"{p:.0e}" if p < 1e-3 else f"{p:.3f}"


class AttributionAnalysis(Analysis):
    """Compare the attribution methods on the probe images, and check them, every epoch.

    Draws `plots/attributions_{epoch}.png` (the display probes' maps; each row's colour scale
    is the running maximum of |map| over the epochs so far), and on the check set
    `attribution_faithfulness`, `attribution_randomisation` and `attribution_drift`. Every
    statistic is a mean over the check images with a bootstrap interval, in metrics.json as
    `<name>/mean`, `<name>/ci_low`, `<name>/ci_high`; for each method key:

    - `faithfulness/{deletion,insertion,road_morf,road_lerf}_auc/<key>/...` (also `random`),
      `faithfulness/{deletion,insertion,road_morf,road_lerf}_p/<key>` (one-sided Wilcoxon
      signed-rank against the random order), `faithfulness/rank/<key>` and, from the second
      epoch, `faithfulness/ranking_tau/...`;
    - `sanity/spearman/<key>/depth_<k>/...` (cascade, top k layers) and
      `sanity/spearman_independent/<key>/depth_<k>/...` (the k-th layer alone),
      `sanity/spearman_all_draws/<key>/...` and `sanity/ssim/<key>/...` (every layer, every
      draw of the random weights), `sanity/control_image/<key>/...`,
      `sanity/control_seed/<key>/...`, `sanity/excess_over_image/<key>/...` and
      `sanity/verdict/<key>` (1 flagged, 0 inconclusive, -1 depends on the weights);
    - `attributions/drift/<key>/...` (from the second epoch) and
      `attributions/settled_after/<key>`; `attributions/seconds/<part>`.

    Args:
        settings: sizes, costs and thresholds.
        seed: seeds the check set, SmoothGrad's noise, the random pixel orders, ROAD's noise,
            the randomised weights and the bootstrap.
        methods: the methods to compare and check, `{key: method}` with the call shape
            `(model, images, targets) -> maps`; None: the six of `default_methods`, bound to
            the blank image and the value range of the check images.
    """

    name = "attributions"
    figures = (
        FigureInfo(
            "attributions",
            "Attribution methods compared",
            "Several attribution methods explaining the same probe images.",
        ),
        FigureInfo(
            "attribution_faithfulness",
            "Attribution faithfulness",
            "True-class probability as the pixels each method ranks first are deleted "
            "(blank) or inserted, and as they are removed and imputed from their neighbours "
            "(ROAD, most and least relevant first); mean over the check images with 95% "
            "bootstrap bands. Dashed: a random pixel order.",
        ),
        FigureInfo(
            "attribution_randomisation",
            "Attribution randomisation",
            "Rank correlation of each method's maps with the trained model's as its layers "
            "are re-initialised from the top (cascade) or one at a time (independent), "
            "against what the image alone explains. Bands: 95% bootstrap intervals.",
        ),
        FigureInfo(
            "attribution_drift",
            "Attribution drift and ranking",
            "How much each method's maps changed since the epoch before, against the "
            "held-out accuracy, and the methods' faithfulness ranking per epoch.",
        ),
    )

    def __init__(
        self,
        settings: AttributionSettings | None = None,
        seed: int = 0,
        methods: Mapping[str, AttributionMethod] | None = None,
    ) -> None:
        self.settings = settings or AttributionSettings()
        self.seed = seed
        self.methods = None if methods is None else dict(methods)
        self.method_keys: list[str] = []
        self.scales = torch.zeros(0)
        self.check_indices: Tensor | None = None
        self.check_keys: list[str] = []
        self.previous_maps: Tensor | None = None  # check maps of the last epoch [M, N, H, W]
        self.previous_scores: Tensor | None = None  # faithfulness per image [M, N]
        self.previous_epoch = 0
        self.accuracy: dict[int, float] = {}
        self.drift: dict[str, list[tuple[int, float, float, float]]] = {}
        self.ranks: dict[int, dict[str, int]] = {}
        self.taus: list[tuple[int, float, float, float]] = []
        self._cache: dict[Any, Any] = {}  # not state: randomised maps, recomputed on resume
        self._check_data: tuple[Tensor, Tensor] | None = None
        self.told_layout = False

    def state_dict(self) -> dict[str, Any]:
        """What `--resume` needs: the check set, colour scales, last maps and the history.

        Returns:
            Plain lists, dicts, numbers and CPU tensors (copies).
        """
        state: dict[str, Any] = {
            "method_keys": list(self.method_keys),
            "scales": self.scales.clone(),
            "check_keys": list(self.check_keys),
            "previous_epoch": self.previous_epoch,
            "accuracy": dict(self.accuracy),
            "drift": {key: [list(row) for row in rows] for key, rows in self.drift.items()},
            "ranks": {epoch: dict(ranks) for epoch, ranks in self.ranks.items()},
            "taus": [list(row) for row in self.taus],
        }
        for name in ("check_indices", "previous_maps", "previous_scores"):
            value = getattr(self, name)
            if value is not None:
                state[name] = value.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned.

        Args:
            state: the mapping `state_dict` returned, possibly after a `torch.save` /
                `torch.load(weights_only=True)` round trip.
        """
        self.method_keys = list(state["method_keys"])
        self.scales = torch.as_tensor(state["scales"]).float().clone()
        self.check_keys = list(state["check_keys"])
        self.previous_epoch = int(state["previous_epoch"])
        self.accuracy = {int(e): float(a) for e, a in state["accuracy"].items()}
        self.drift = {
            key: [(int(r[0]), float(r[1]), float(r[2]), float(r[3])) for r in rows]
            for key, rows in state["drift"].items()
        }
        self.ranks = {
            int(e): {k: int(v) for k, v in ranks.items()} for e, ranks in state["ranks"].items()
        }
        self.taus = [(int(r[0]), float(r[1]), float(r[2]), float(r[3])) for r in state["taus"]]
        for name in ("check_indices", "previous_maps", "previous_scores"):
            value = state.get(name)
            setattr(self, name, None if value is None else torch.as_tensor(value).clone())
        self._check_data = None

    def _check_set(self, ctx: EpochContext) -> tuple[Tensor, Tensor]:
        """The check images [N, C, H, W] and labels [N] on the device, chosen on first use."""
        if self.check_indices is None:
            targets = ctx.eval.targets if ctx.eval is not None else dataset_targets(ctx.val_data)
            wanted = self.settings.check_size
            self.check_indices = choose_check_set(targets, wanted, self.seed, ctx.probe.indices)
            if self.check_indices.numel() < wanted:
                ctx.log(
                    f"attributions: --check-size {wanted} is more than the "
                    f"{self.check_indices.numel()} held-out images besides the probes: "
                    "checking all of them"
                )
        if self._check_data is None:
            images, labels = gather(ctx.val_data, self.check_indices)
            self._check_data = (images.to(ctx.device), labels.to(ctx.device))
        return self._check_data

    def __call__(self, ctx: EpochContext) -> None:
        """Explain the probes, check every method on the check set, draw and log it all."""
        settings, probe, model = self.settings, ctx.probe, ctx.model
        seconds: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(part: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[part], clock = now - clock, now

        images, labels = self._check_set(ctx)
        fast = channels_last_copy(model, images[:8])
        if fast is not None:
            model = fast
        elif images.device.type == "cpu" and not self.told_layout:
            ctx.log(
                "attributions: the model cannot run in channels-last memory format; the "
                "checks use it as it is (about 1.5 times slower on the CPU)"
            )
            self.told_layout = True
        baseline = blank_image(ctx.normalization, images)
        methods = self.methods or default_methods(
            baseline,
            settings,
            seed=self.seed,
            value_range=float(images.max() - images.min()),
            grad_cam_layer=last_conv_layer(model) is not None,
        )
        explain = functools.partial(
            attribution_maps, methods=methods, batch_size=settings.batch_size
        )

        display_errors: dict[str, str] = {}
        display = explain(model, probe.images, probe.labels, errors=display_errors)
        display_keys = [key for key in methods if key not in display_errors]
        display = display[[list(methods).index(key) for key in display_keys]]
        self._start(display_keys)
        self.scales = torch.maximum(self.scales, display.abs().flatten(1).amax(dim=1))
        with torch.no_grad(), evaluation_mode(model):
            probe_probability = model(probe.images).float().softmax(dim=1)
        probe_probability = probe_probability.gather(1, probe.labels[:, None]).squeeze(1)
        ctx.draw_figure(
            "attributions",
            plot_attributions,
            probe.pixels,
            display,
            self.scales,
            display_keys,
            probe.labels.tolist(),
            probe_probability.tolist(),
            ctx.class_names,
            title=f"Attributions towards the true class, {ctx.when}",
        )
        lap("display")

        errors: dict[str, str] = {}
        maps = explain(model, images, labels, errors=errors)
        keys = [key for key in methods if key not in errors]
        maps = maps[[list(methods).index(key) for key in keys]]
        kept_methods = {key: methods[key] for key in keys}
        lap("maps")
        for key, message in errors.items():
            ctx.log(
                f"attributions: {METHOD_LABELS.get(key, key)} failed, {message}; "
                "left out of this epoch's checks"
            )
        if not keys:
            return

        curves = deletion_insertion(
            model,
            images,
            labels,
            maps,
            baseline,
            names=keys,
            steps=settings.deletion_steps,
            batch_size=settings.batch_size,
            generator=torch.Generator().manual_seed(self.seed),
        )
        lap("deletion_insertion")
        road = road_curves(
            model,
            images,
            labels,
            maps,
            names=keys,
            fractions=settings.road_fractions,
            noise=settings.road_noise,
            batch_size=settings.batch_size,
            generator=torch.Generator().manual_seed(self.seed + 1),
        )
        lap("road")
        randomisation = randomisation_checks(
            model,
            images,
            labels,
            functools.partial(
                attribution_maps,
                methods=kept_methods,
                batch_size=settings.batch_size,
                errors={},
            ),
            maps,
            names=keys,
            image_maps=image_control_map(images, baseline),
            seed=self.seed,
            draws=settings.randomisation_draws,
            independent=settings.independent,
            cache=self._cache,
        )
        lap("randomisation")

        bootstrap = Bootstrap(
            maps.shape[1], settings.bootstrap_resamples, settings.confidence, seed=self.seed
        )
        scores = self._faithfulness(ctx, bootstrap, keys, curves, road)
        self._randomisation(ctx, bootstrap, keys, randomisation)
        self._drift(ctx, bootstrap, keys, maps, scores)
        lap("statistics")
        for part, value in seconds.items():
            ctx.metrics[f"attributions/seconds/{part}"] = value

    def _start(self, keys: list[str]) -> None:
        if keys != self.method_keys:  # first call, or another set of methods: start afresh
            self.method_keys = keys
            self.scales = torch.zeros(len(keys))

    def _faithfulness(
        self,
        ctx: EpochContext,
        bootstrap: Bootstrap,
        keys: list[str],
        curves: FaithfulnessCurves,
        road: RoadCurves,
    ) -> Tensor:
        """Record, log and draw the curves; return the per-image scores [M, N] of `keys`."""
        settings = self.settings
        names = curves.names
        per_image = {
            "deletion": curves.image_deletion_auc,
            "insertion": curves.image_insertion_auc,
            "road_morf": road.image_morf_auc,
            "road_lerf": road.image_lerf_auc,
        }
        lower_is_better = {
            "deletion": True,
            "insertion": False,
            "road_morf": True,
            "road_lerf": False,
        }
        intervals = {part: bootstrap.interval(values) for part, values in per_image.items()}
        p_values = {
            part: better_than_random(values[:-1], values[-1], lower_is_better=lower_is_better[part])
            for part, values in per_image.items()
        }
        for part, interval in intervals.items():
            for index, key in enumerate(names):
                _interval_metrics(ctx.metrics, f"faithfulness/{part}_auc/{key}", interval[index])
            for index, key in enumerate(keys):
                ctx.metrics[f"faithfulness/{part}_p/{key}"] = float(p_values[part][index])
        level = settings.significance / len(keys)
        better = [
            key
            for index, key in enumerate(keys)
            if float(p_values["deletion"][index]) < level
            and float(p_values["insertion"][index]) < level
        ]
        label = functools.partial(METHOD_LABELS.get)
        ctx.log(
            f"attributions, faithfulness on {bootstrap.count} check images (mean AUC "
            f"[{settings.confidence:.0%} CI], deletion lower / insertion higher is better, "
            f"blank baseline, {settings.deletion_steps} steps): "
            + ", ".join(
                f"{label(key, key)} {intervals['deletion'][i].text()} / "
                f"{intervals['insertion'][i].text()}"
                for i, key in enumerate(names)
            )
        )
        ctx.log(
            "attributions, ROAD (noisy linear imputation; most relevant first lower / least "
            "relevant first higher is better): "
            + ", ".join(
                f"{label(key, key)} {intervals['road_morf'][i].text()} / "
                f"{intervals['road_lerf'][i].text()}"
                for i, key in enumerate(names)
            )
        )
        ctx.log(
            "attributions, better than the random order on deletion and insertion (one-sided "
            f"Wilcoxon signed-rank, paired over images, p < {level:.2g} each, Bonferroni): "
            + (", ".join(label(key, key) for key in better) or "none")
            + "; not: "
            + (
                ", ".join(
                    f"{label(key, key)} (p {_p_text(float(p_values['deletion'][i]))} / "
                    f"{_p_text(float(p_values['insertion'][i]))})"
                    for i, key in enumerate(keys)
                    if key not in better
                )
                or "none"
            )
        )

        def legend(part: str) -> list[str]:
            rows = []
            for index, key in enumerate(names):
                text = f"{label(key, key)}  {intervals[part][index].text()}"
                if index < len(keys):
                    text += f"  p {_p_text(float(p_values[part][index]))}"
                rows.append(text)
            return rows

        ctx.draw_figure(
            "attribution_faithfulness",
            plot_faithfulness,
            names,
            {key: label(key, key) for key in names},
            curves.fractions,
            bootstrap.interval(curves.deletion.transpose(1, 2)),
            bootstrap.interval(curves.insertion.transpose(1, 2)),
            road.fractions,
            bootstrap.interval(road.most_relevant_first.transpose(1, 2)),
            bootstrap.interval(road.least_relevant_first.transpose(1, 2)),
            {part: legend(part) for part in per_image},
            title=f"Faithfulness {ctx.when}, {bootstrap.count} check images",
        )
        return faithfulness_score(per_image["deletion"][:-1], per_image["insertion"][:-1])

    def _randomisation(
        self,
        ctx: EpochContext,
        bootstrap: Bootstrap,
        keys: list[str],
        checks: RandomisationChecks,
    ) -> None:
        """Record, log and draw the randomisation check and its verdicts."""
        label = functools.partial(METHOD_LABELS.get)
        if not checks.layers:
            ctx.log(
                "attributions, randomisation: skipped, the model has no layer with "
                "parameters and reset_parameters()"
            )
            return
        for key, message in checks.errors.items():
            ctx.log(f"attributions, randomisation: {label(key, key)} left out: {message}")
        usable = [i for i, key in enumerate(keys) if key not in checks.errors]
        cascade = bootstrap.interval(checks.cascade_spearman)  # [L, M]
        independent = (
            bootstrap.interval(checks.independent_spearman)
            if checks.independent_spearman.numel()
            else None
        )
        similarity = bootstrap.interval(checks.ssim)
        image_control = bootstrap.interval(checks.image_control)
        seed_control = bootstrap.interval(checks.seed_control)
        draws = checks.full_spearman.shape[0]
        full = bootstrap.interval_over_draws(checks.full_spearman.transpose(0, 1))  # [M]
        excess = bootstrap.interval_over_draws(excess_over_image(checks))  # [M]
        verdict = randomisation_verdict(excess)
        verdicts: dict[str, float] = {}
        for index in usable:
            key = keys[index]
            for depth in range(len(checks.layers)):
                _interval_metrics(
                    ctx.metrics, f"sanity/spearman/{key}/depth_{depth + 1}", cascade[depth, index]
                )
                if independent is not None:
                    _interval_metrics(
                        ctx.metrics,
                        f"sanity/spearman_independent/{key}/depth_{depth + 1}",
                        independent[depth, index],
                    )
            _interval_metrics(ctx.metrics, f"sanity/spearman_all_draws/{key}", full[index])
            _interval_metrics(ctx.metrics, f"sanity/ssim/{key}", similarity[index])
            _interval_metrics(ctx.metrics, f"sanity/control_image/{key}", image_control[index])
            _interval_metrics(ctx.metrics, f"sanity/control_seed/{key}", seed_control[index])
            _interval_metrics(ctx.metrics, f"sanity/excess_over_image/{key}", excess[index])
            verdicts[key] = float(verdict[index])
            ctx.metrics[f"sanity/verdict/{key}"] = verdicts[key]
        words = {
            FLAGGED: "FLAGGED",
            DEPENDS: "depends on the weights",
            INCONCLUSIVE: "inconclusive",
        }
        flagged = [label(key, key) for key, v in verdicts.items() if v == FLAGGED]
        ctx.log(
            f"attributions, randomisation (|map| Spearman with the trained model's after "
            f"randomising all {len(checks.layers)} layers, {draws} draws, against the image "
            "alone; difference [CI]): "
            + ", ".join(
                f"{label(keys[i], keys[i])} {full[i].text()} vs "
                f"{image_control[i].text()}: {words[verdicts[keys[i]]]}"
                + (f" ({excess[i].text()})" if verdicts[keys[i]] == INCONCLUSIVE else "")
                for i in usable
            )
            + (
                f"; FLAGGED (randomised maps resemble the trained ones more than the image "
                f"does: they do not depend on the weights): {', '.join(flagged)}"
                if flagged
                else "; none flagged"
            )
        )
        ctx.draw_figure(
            "attribution_randomisation",
            plot_randomisation,
            [keys[i] for i in usable],
            {key: label(key, key) for key in keys},
            checks.layers,
            cascade[:, usable],
            None if independent is None else independent[:, usable],
            full[usable],
            draws,
            image_control[usable],
            seed_control[usable],
            excess[usable],
            [words[verdicts[keys[i]]] for i in usable],
            title=f"Randomisation check {ctx.when}, {bootstrap.count} check images",
        )

    def _drift(
        self,
        ctx: EpochContext,
        bootstrap: Bootstrap,
        keys: list[str],
        maps: Tensor,
        scores: Tensor,
    ) -> None:
        """Drift since the last epoch, settling, the ranking and its stability."""
        settings = self.settings
        label = functools.partial(METHOD_LABELS.get)
        if ctx.eval is not None:
            self.accuracy[ctx.epoch] = float(ctx.eval.accuracy)
        order = torch.argsort(scores.mean(dim=1), descending=True).tolist()
        self.ranks[ctx.epoch] = {keys[i]: rank + 1 for rank, i in enumerate(order)}
        for key, rank in self.ranks[ctx.epoch].items():
            ctx.metrics[f"faithfulness/rank/{key}"] = float(rank)
        messages = []
        previous_keys = self.check_keys
        common = [key for key in keys if key in previous_keys]
        if (
            self.previous_maps is not None
            and common
            and self.previous_maps.shape[1:] == maps.shape[1:]
        ):
            now = maps[[keys.index(k) for k in common]]
            before = self.previous_maps[[previous_keys.index(k) for k in common]]
            rho = spearman(
                now.abs().flatten(0, 1), before.abs().flatten(0, 1), ignore_joint_zeros=True
            ).view(len(common), -1)
            drift = bootstrap.interval(rho)
            for index, key in enumerate(common):
                row = (
                    ctx.epoch,
                    float(drift.mean[index]),
                    float(drift.low[index]),
                    float(drift.high[index]),
                )
                self.drift.setdefault(key, []).append(row)
                _interval_metrics(ctx.metrics, f"attributions/drift/{key}", drift[index])
            if self.previous_scores is not None and len(common) > 1:
                tau = ranking_stability(
                    self.previous_scores[[previous_keys.index(k) for k in common]],
                    scores[[keys.index(k) for k in common]],
                    bootstrap,
                )
                self.taus.append((ctx.epoch, float(tau.mean), float(tau.low), float(tau.high)))
                _interval_metrics(ctx.metrics, "faithfulness/ranking_tau", tau)
                messages.append(f"ranking Kendall τ with epoch {self.previous_epoch} {tau.text()}")
            moving = []
            settled: dict[str, int | None] = {}
            for key in common:
                rows = self.drift[key]
                settled[key] = settled_after(
                    [row[0] for row in rows],
                    torch.tensor([[row[1]] for row in rows]),
                    settings.settled_threshold,
                )
                if settled[key] is None:
                    moving.append(label(key, key))
                else:
                    ctx.metrics[f"attributions/settled_after/{key}"] = float(settled[key])
            ctx.log(
                f"attributions, drift (|map| Spearman with epoch {self.previous_epoch}): "
                + ", ".join(f"{label(k, k)} {drift[i].text()}" for i, k in enumerate(common))
                + "; settled (>= "
                + f"{settings.settled_threshold:g} since): "
                + (
                    ", ".join(
                        f"{label(k, k)} after epoch {settled[k]}"
                        for k in common
                        if settled[k] is not None
                    )
                    or "none"
                )
                + (f"; still moving: {', '.join(moving)}" if moving else "")
            )
        ctx.log(
            "attributions, ranking by faithfulness (insertion - deletion AUC): "
            + " > ".join(label(keys[i], keys[i]) for i in order)
            + (f"; {messages[0]}" if messages else "")
        )
        settled_now = {
            key: settled_after(
                [r[0] for r in rows],
                torch.tensor([[r[1]] for r in rows]),
                settings.settled_threshold,
            )
            for key, rows in self.drift.items()
        }
        ctx.draw_figure(
            "attribution_drift",
            plot_drift,
            {key: label(key, key) for key in keys},
            dict(self.accuracy),
            {key: list(rows) for key, rows in self.drift.items()},
            settled_now,
            settings.settled_threshold,
            {epoch: dict(ranks) for epoch, ranks in self.ranks.items()},
            list(self.taus),
            title=f"Explanation drift and faithfulness ranking, {ctx.when}",
        )
        self.previous_maps, self.previous_scores = maps, scores
        self.check_keys, self.previous_epoch = list(keys), ctx.epoch

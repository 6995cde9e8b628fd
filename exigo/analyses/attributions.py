r"""Six attribution methods compared on the probe images every epoch, and checked for trust.

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

Every epoch, `AttributionAnalysis` also measures whether the maps can be trusted:
faithfulness by deletion and insertion curves (`exigo.analyses.faithfulness`, Petsiuk et al. 2018),
dependence on the weights by cascading model randomisation (`exigo.analyses.sanity`, Adebayo et al.
2018), and drift: the Spearman rank correlation of each method's $|a|$ with its previous
epoch's, from which the log names the epoch after which explanations settle.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from exigo._modes import evaluation_mode
from exigo.analyses._random import seeded
from exigo.analyses.faithfulness import FaithfulnessCurves, deletion_insertion
from exigo.analyses.sanity import RandomisationResult, cascading_randomisation, spearman
from exigo.analysis import Analysis, CostShape, EpochContext, FigureInfo
from exigo.data import blank_image
from exigo.figures.tiles import TileBlock, TileRow, display_tiles, object_outline, tile_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


__all__ = [
    "METHOD_LABELS",
    "AttributionAnalysis",
    "AttributionMethod",
    "AttributionSettings",
    "attribution_maps",
    "default_methods",
    "grad_cam",
    "input_x_gradient",
    "integrated_gradients",
    "last_conv_layer",
    "occlusion",
    "plot_attribution_checks",
    "plot_attributions",
    "saliency",
    "settled_after",
    "smoothgrad",
    "summary_block",
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
    """Cost and thresholds of the attribution analysis (defaults fit 10 MNIST probe images).

    The defaults keep the whole analysis near 1 s per epoch on a 2-core CPU (see the README).
    """

    ig_steps: int = 16
    """Gauss-Legendre points of the Integrated Gradients path integral."""

    smoothgrad_samples: int = 16
    """Noisy copies per image."""

    smoothgrad_noise: float = 0.15
    """Noise sigma as a fraction of the images' value range."""

    occlusion_window: int = 7
    """Side of the square occluding patch, pixels of a 28-pixel image (`AttributionAnalysis`
    scales it with the image's shorter side: 56 pixels on 224x224 images)."""

    occlusion_stride: int = 3
    """Step between patches, pixels of a 28-pixel image, scaled like the window (7 + 7 * 3 =
    28 covers MNIST; 8 x 8 patch positions on any image size)."""

    batch_size: int = 256
    """Images per forward/backward pass inside every method and curve."""

    deletion_steps: int = 10
    """Steps k of the deletion/insertion curves (k + 1 points; AUCs within 0.02 of k = 28)."""

    randomisation_stages: int = 2
    """Cascade depths evaluated: top layer, then all layers."""

    unchanged_threshold: float = 0.7
    """Flag a method whose |map| Spearman after full randomisation is at least this.

    A map copied from the image scores 1, the gradient about 0.1; on MNIST the methods tied to
    the ink (Occlusion, Integrated Gradients, Input x Gradient) stay at 0.35-0.6 although their
    maps changed. 0.7 flags maps that come through the destruction of every weight mostly
    intact.
    """

    settled_threshold: float = 0.8
    """Settled: every method's drift Spearman >= this."""


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

    $\sigma$ = `noise` times the value range of the data. The noise comes from `seed` and the
    global random state is restored afterwards: the same call gives the same map. (The draws
    are shared out over the images of the call, so an image's map also depends on which
    images are attributed with it; `attribution_maps` always passes the same chunks.)

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
    from captum.attr import NoiseTunnel, Saliency

    if value_range is None:
        value_range = float(images.max() - images.min())
    sigma = noise * value_range
    with seeded(seed, images.device):
        return (
            NoiseTunnel(Saliency(model))
            .attribute(
                _with_gradient(images),
                nt_type="smoothgrad",
                nt_samples=samples,
                nt_samples_batch_size=max(1, batch_size // images.shape[0]),
                stdevs=sigma,
                target=targets,
                abs=True,
            )
            .detach()
        )


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

    Returns:
        Float tensor [M, N, H, W] on the CPU, in the order of `methods`.
    """
    per_method = []
    with evaluation_mode(model):
        for method in methods.values():
            parts = [
                method(model, image_batch, target_batch).sum(dim=1).float().cpu()
                for image_batch, target_batch in zip(
                    images.split(batch_size), targets.split(batch_size), strict=True
                )
            ]
            per_method.append(torch.cat(parts))
    return torch.stack(per_method)


def settled_after(epochs: Sequence[int], drift: Tensor, threshold: float) -> int | None:
    """The epoch after which every method's maps stay within `threshold` of the previous ones.

    Args:
        epochs: the epochs at which drift was measured (each compared with the one before).
        drift: float tensor [E, M], Spearman of |maps| with the previous epoch's, per method.
        threshold: the rank correlation that counts as unchanged.

    Returns:
        The epoch e such that every drift measured after e is at least `threshold` (and the
        one at e is not, or e is the first compared epoch), or None if the last drift is below
        the threshold or none was measured.
    """
    if drift.numel() == 0:
        return None
    stable = (drift >= threshold).all(dim=1).tolist()
    if not stable[-1]:
        return None
    first = len(stable) - 1
    while first > 0 and stable[first - 1]:
        first -= 1
    return epochs[first] - 1  # drift at epochs[first] compares it with the epoch before


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
    take most of the analysis' time to render. A grey line over each map marks the object's
    outline where that is one (`exigo.figures.tiles.object_outline`: one channel, dark
    background); otherwise there is none, and the footnote does not mention one.

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
    seen = pixels.detach().float().cpu().clamp(0, 1).numpy()  # (N, C, H, W)
    outline = object_outline(seen)  # None for colour or light-background images
    tiles = display_tiles(seen)
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
                outline=outline,
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
        "blue lowers it."
        + ("  Grey line: the object's outline (intensity 0.5)." if outline is not None else "")
        + (
            f"  Maps: at every pixel, the sum over the {seen.shape[1]} colour channels "
            "(Occlusion's window covers all of them, so its value counts once per channel; "
            "Grad-CAM has one map, upsampled)."
            if seen.shape[1] > 1
            else ""
        )
        + "\nEach row's colour scale is "
        "± the largest |attribution| of that method in any epoch so far, so later epochs "
        "compare with earlier ones.",
    )


def plot_attribution_checks(
    curves: FaithfulnessCurves,
    randomisation: RandomisationResult,
    unchanged_threshold: float,
    title: str,
) -> Figure:
    """Mean deletion and insertion curves, and the rank correlation along the randomisation.

    Args:
        curves: the epoch's deletion/insertion curves (last order: random).
        randomisation: the cascading randomisation of the same methods.
        unchanged_threshold: the Spearman above which a method is flagged.
        title: the figure's title.

    Returns:
        A matplotlib Figure with three panels.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(14, 4.2))
    figure.subplots_adjust(left=0.05, right=0.98, bottom=0.17, top=0.86, wspace=0.3)
    deletion_axes, insertion_axes, sanity_axes = figure.subplots(1, 3)
    fractions = curves.fractions.numpy()
    for axes, values, aucs, noun, verb, better in (
        (deletion_axes, curves.deletion, curves.deletion_auc, "deletion", "deleted", "lower"),
        (insertion_axes, curves.insertion, curves.insertion_auc, "insertion", "inserted", "higher"),
    ):
        for index, key in enumerate(curves.names):
            random_order = key == "random"
            axes.plot(
                fractions,
                values[index].mean(dim=0).numpy(),
                color="black" if random_order else f"C{index}",
                linestyle="--" if random_order else "-",
                linewidth=1.2,
                label=f"{METHOD_LABELS.get(key, key)}  AUC {float(aucs[index]):.3f}",
            )
        axes.set_xlabel(f"fraction of pixels {verb}, most important first")
        axes.set_ylabel("true-class probability, mean over images")
        axes.set_title(f"{noun} (blank baseline): AUC {better} is better", fontsize=10)
        axes.set_ylim(-0.02, 1.02)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="upper right" if verb == "deleted" else "lower right")
    stages = list(range(randomisation.depth.numel() + 1))  # evenly spaced, labelled by depth
    for index, key in enumerate(curves.names[:-1]):
        rho = [1.0, *randomisation.spearman[:, index].tolist()]
        sanity_axes.plot(
            stages, rho, marker="o", color=f"C{index}", label=METHOD_LABELS.get(key, key)
        )
    sanity_axes.axhline(
        unchanged_threshold,
        color="red",
        linestyle=":",
        linewidth=1,
        label=f"flag: unchanged (>= {unchanged_threshold:g})",
    )
    depth_labels = [
        f"{depth} layer{'s' if depth > 1 else ''}\n(to {layer})"
        for depth, layer in zip(randomisation.depth.tolist(), randomisation.layers, strict=True)
    ]
    sanity_axes.set_xticks(stages, ["none", *depth_labels], fontsize=8)
    sanity_axes.set_xlabel(
        f"layers re-initialised from the top down (of {randomisation.total_layers})"
    )
    sanity_axes.set_ylabel("Spearman of |map| with the\ntrained model's, mean")
    sanity_axes.set_ylim(-0.2, 1.05)
    sanity_axes.set_xlim(-0.3, stages[-1] + 0.45)
    sanity_axes.grid(alpha=0.3)
    sanity_axes.set_title("model randomisation (Adebayo et al. 2018)", fontsize=10)
    sanity_axes.legend(fontsize=7, loc="lower left")
    figure.suptitle(title, fontsize=11)
    return figure


def summary_block(
    heading: str,
    rows: Sequence[tuple[str, str]],
    verdict: str,
    names: Sequence[str] | None,
) -> str:
    """A console block: the heading, one aligned line per method, then the verdict.

    One method per line, so no terminal of 80 columns or more breaks a line inside a method's
    name (a sentence of six methods with their numbers did: "Input ×" / "Gradient").

    Args:
        heading: what the numbers are.
        rows: `(method label, its numbers)` per method.
        verdict: the verdict's label ("not better than random on both").
        names: the methods the verdict names (`[]`: "none"); None: `verdict` is the whole line.

    Returns:
        The block, lines joined with newlines.
    """
    width = max((len(label) for label, _ in rows), default=0)
    lines = [f"{heading}:", *(f"  {label:<{width}}  {numbers}" for label, numbers in rows)]
    if names is None:
        lines.append(f"  {verdict}")
    else:
        lines.append(f"  {verdict}: {', '.join(names) or 'none'}")
        if len(lines[-1]) > 78:  # one name per line rather than a break inside one
            lines[-1:] = [f"  {verdict}:", *(f"    {name}" for name in names)]
    return "\n".join(lines)


class AttributionAnalysis(Analysis):
    """Compare the attribution methods on the probe images and check them, every epoch.

    Writes `plots/attributions_{epoch}.png` (maps; each row's colour scale is the running
    maximum of |map| over the epochs so far, so later figures compare with earlier ones) and
    `plots/attribution_checks_{epoch}.png` (curves), and adds these metrics per method key:
    `faithfulness/deletion_auc/<key>`, `faithfulness/insertion_auc/<key>` (also for `random`),
    `sanity/spearman/<key>`, `sanity/ssim/<key>` (after randomising every layer),
    `sanity/unchanged/<key>` (1 when flagged), `attributions/drift/<key>` (from the second
    epoch), and `attributions/seconds/<part>`.

    Args:
        settings: costs and thresholds.
        seed: seeds SmoothGrad's noise, the random pixel order and the randomised weights.
    """

    name = "attributions"
    figures = (
        FigureInfo(
            "attributions",
            "Attribution methods compared",
            "Several attribution methods explaining the same probe images.",
        ),
        FigureInfo(
            "attribution_checks",
            "Attribution checks",
            "Can the attributions be trusted: faithfulness (deleting or inserting the pixels "
            "they rank first) and sensitivity to randomising the model's weights.",
        ),
    )

    def __init__(self, settings: AttributionSettings | None = None, seed: int = 0) -> None:
        self.settings = settings or AttributionSettings()
        self.seed = seed
        self.method_keys: list[str] = []
        self.scales = torch.zeros(0)
        self.previous_maps: Tensor | None = None
        self.previous_epoch = 0
        self.drift_epochs: list[int] = []
        self.drift = torch.zeros(0, 0)
        self.randomised_maps: dict[str, Tensor] = {}  # not state: recomputed after a resume

    def settings_for(self, image_shape: Sequence[int]) -> AttributionSettings:
        """The settings used on images of `image_shape` at the pipeline's `scale`.

        The occlusion window and stride scale with the image's shorter side (the settings are
        for 28 pixels). Below `scale` 1 (`exigo.engine.budget`), Integrated Gradients' steps,
        SmoothGrad's samples and the deletion steps shrink in proportion (at least 4, 4 and
        5), the stride grows by 1 / sqrt(scale) (proportionally fewer patches), and below 0.5
        only the fully randomised model is checked (computed once, then cached).

        Args:
            image_shape: `(C, H, W)`.

        Returns:
            The effective settings.
        """
        settings, scale = self.settings, self.scale
        side = min(int(image_shape[-2]), int(image_shape[-1])) / 28
        window = max(1, round(settings.occlusion_window * side))
        stride = max(1, round(settings.occlusion_stride * side / math.sqrt(scale)))
        if scale >= 1:
            return replace(settings, occlusion_window=window, occlusion_stride=stride)
        return replace(
            settings,
            ig_steps=max(4, round(settings.ig_steps * scale)),
            smoothgrad_samples=max(4, round(settings.smoothgrad_samples * scale)),
            occlusion_window=window,
            occlusion_stride=stride,
            deletion_steps=max(5, round(settings.deletion_steps * scale)),
            randomisation_stages=settings.randomisation_stages if scale >= 0.5 else 1,
        )

    def cost(self, shape: CostShape) -> float:
        """Passes per epoch in which it runs.

        Per probe image, with $m$ the passes of all maps (1 each for Saliency, Input x
        Gradient and Grad-CAM, the steps of Integrated Gradients, the samples of SmoothGrad,
        a third per occlusion patch): $m$ for the maps, $m$ for each randomisation stage, and
        a third per image of the $2 (M + 1) (k - 1)$ deletion and insertion forward passes.
        (The fully randomised model is the same every epoch, so from its second call on its
        maps come from a cache: $m$ per image less than declared. The first call, often the
        only one when the budget makes it run every k epochs, pays it.)

        Args:
            shape: probe size, classes and image shape.

        Returns:
            Forward-backward passes per epoch.
        """
        settings = self.settings_for(shape.image_shape)
        _, height, width = shape.image_shape
        window, stride = settings.occlusion_window, settings.occlusion_stride
        patches = math.prod(
            (max(size - min(window, size), 0) // stride + 1) for size in (height, width)
        )
        maps = 3 + settings.ig_steps + settings.smoothgrad_samples + patches / 3
        curves = 2 * 7 * (settings.deletion_steps - 1) / 3  # M + 1 = 7 orders
        sanity = settings.randomisation_stages * maps
        return shape.probe_images * (maps + sanity + curves)

    def state_dict(self) -> dict[str, Any]:
        """What `--resume` needs: colour scales, last maps and the drift history.

        Returns:
            Plain lists, numbers and CPU tensors (a copy): `method_keys`, `scales` (float
            [M]), `previous_epoch`, `drift_epochs`, `drift` (float [E, M]) and, once maps
            exist, `previous_maps`.
        """
        state: dict[str, Any] = {
            "method_keys": list(self.method_keys),
            "scales": self.scales.clone(),
            "previous_epoch": self.previous_epoch,
            "drift_epochs": list(self.drift_epochs),
            "drift": self.drift.clone(),
        }
        if self.previous_maps is not None:
            state["previous_maps"] = self.previous_maps.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned.

        Args:
            state: the mapping `state_dict` returned, possibly after a `torch.save` /
                `torch.load(weights_only=True)` round trip.
        """
        self.method_keys = list(state["method_keys"])
        self.scales = torch.as_tensor(state["scales"]).float().clone()
        self.previous_epoch = int(state["previous_epoch"])
        self.drift_epochs = [int(epoch) for epoch in state["drift_epochs"]]
        self.drift = torch.as_tensor(state["drift"]).float().clone()
        previous = state.get("previous_maps")
        self.previous_maps = None if previous is None else torch.as_tensor(previous).clone()

    def _start(self, keys: list[str]) -> None:
        if keys != self.method_keys:  # first call, or another set of methods: start afresh
            self.method_keys = keys
            self.scales = torch.zeros(len(keys))
            self.previous_maps = None
            self.drift_epochs = []
            self.drift = torch.zeros(0, len(keys))
            self.randomised_maps = {}

    def __call__(self, ctx: EpochContext) -> None:
        """Compute, check, draw and log the attributions of `ctx.probe`."""
        probe, model = ctx.probe, ctx.model
        settings = self.settings_for(probe.images.shape[1:])
        seconds: dict[str, float] = {}
        clock = time.perf_counter()

        baseline = blank_image(ctx.normalization, probe.images)
        methods = default_methods(
            baseline,
            settings,
            seed=self.seed,
            value_range=float(probe.images.max() - probe.images.min()),
            grad_cam_layer=last_conv_layer(model) is not None,
        )
        keys = list(methods)
        self._start(keys)
        explain = functools.partial(
            attribution_maps, methods=methods, batch_size=settings.batch_size
        )
        maps = explain(model, probe.images, probe.labels)  # (M, P, H, W)
        self.scales = torch.maximum(self.scales, maps.abs().flatten(1).amax(dim=1))
        seconds["maps"], clock = time.perf_counter() - clock, time.perf_counter()

        curves = deletion_insertion(
            model,
            probe.images,
            probe.labels,
            maps,
            baseline,
            names=keys,
            steps=settings.deletion_steps,
            batch_size=settings.batch_size,
            generator=torch.Generator().manual_seed(self.seed),
        )
        seconds["faithfulness"], clock = time.perf_counter() - clock, time.perf_counter()

        randomisation = cascading_randomisation(
            model,
            probe.images,
            probe.labels,
            explain,
            maps,
            stages=settings.randomisation_stages,
            seed=self.seed,
            cache=self.randomised_maps,
        )
        seconds["sanity"], clock = time.perf_counter() - clock, time.perf_counter()

        drift = None
        if self.previous_maps is not None and self.previous_maps.shape == maps.shape:
            drift = (
                spearman(
                    maps.abs().flatten(0, 1),
                    self.previous_maps.abs().flatten(0, 1),
                    ignore_joint_zeros=True,
                )
                .view(len(keys), -1)
                .mean(dim=1)
            )
            self.drift_epochs.append(ctx.epoch)
            self.drift = torch.cat([self.drift, drift[None]])
        previous_epoch, self.previous_maps, self.previous_epoch = (
            self.previous_epoch,
            maps,
            ctx.epoch,
        )

        ctx.draw_figure(
            "attributions",
            plot_attributions,
            probe.pixels,
            maps,
            self.scales,
            keys,
            probe.labels.tolist(),
            curves.deletion[0, :, 0].tolist(),
            ctx.class_names,
            title=f"Attributions towards the true class, {ctx.when}",
        )
        ctx.draw_figure(
            "attribution_checks",
            plot_attribution_checks,
            curves,
            randomisation,
            settings.unchanged_threshold,
            title=f"Can the attributions be trusted? {ctx.when.capitalize()}, "
            f"{probe.labels.numel()} probe images",
        )
        seconds["figures"] = time.perf_counter() - clock

        self._record(ctx, keys, curves, randomisation, drift, previous_epoch, seconds)

    def _record(
        self,
        ctx: EpochContext,
        keys: list[str],
        curves: FaithfulnessCurves,
        randomisation: RandomisationResult,
        drift: Tensor | None,
        previous_epoch: int,
        seconds: dict[str, float],
    ) -> None:
        settings = self.settings
        deletion, insertion = curves.deletion_auc.tolist(), curves.insertion_auc.tolist()
        for key, deleted, inserted in zip(curves.names, deletion, insertion, strict=True):
            ctx.metrics[f"faithfulness/deletion_auc/{key}"] = deleted
            ctx.metrics[f"faithfulness/insertion_auc/{key}"] = inserted
        random_deletion, random_insertion = deletion[-1], insertion[-1]
        not_beating = [
            METHOD_LABELS[key]
            for key, deleted, inserted in zip(keys, deletion, insertion, strict=False)
            if not (deleted < random_deletion and inserted > random_insertion)
        ]
        ctx.log(
            summary_block(
                "attributions, faithfulness (AUC deletion lower / insertion higher is better)",
                [
                    (METHOD_LABELS[key], f"{d:.2f} / {i:.2f}")
                    for key, d, i in zip(curves.names, deletion, insertion, strict=True)
                ],
                "not better than random on both",
                not_beating,
            )
        )

        if randomisation.depth.numel():
            rho, similarity = randomisation.spearman[-1], randomisation.ssim[-1]
            flagged = []
            for index, key in enumerate(keys):
                unchanged = float(rho[index]) >= settings.unchanged_threshold
                ctx.metrics[f"sanity/spearman/{key}"] = float(rho[index])
                ctx.metrics[f"sanity/ssim/{key}"] = float(similarity[index])
                ctx.metrics[f"sanity/unchanged/{key}"] = float(unchanged)
                if unchanged:
                    flagged.append(METHOD_LABELS[key])
            depth = int(randomisation.depth[-1])
            ctx.log(
                summary_block(
                    f"attributions, sanity (|map| Spearman / SSIM after randomising {depth} of "
                    f"{randomisation.total_layers} layers)",
                    [
                        (METHOD_LABELS[key], f"{float(rho[i]):.2f} / {float(similarity[i]):.2f}")
                        for i, key in enumerate(keys)
                    ],
                    f"FLAGGED (Spearman >= {settings.unchanged_threshold}: the maps do not "
                    "depend on the weights)",
                    flagged,
                )
            )
        else:
            ctx.log("attributions, sanity: the model has no layer with reset_parameters()")

        if drift is not None:
            for key, value in zip(keys, drift.tolist(), strict=True):
                ctx.metrics[f"attributions/drift/{key}"] = value
            settled = settled_after(self.drift_epochs, self.drift, settings.settled_threshold)
            threshold = settings.settled_threshold
            moving = [
                METHOD_LABELS[key]
                for key, value in zip(keys, drift.tolist(), strict=True)
                if value < threshold
            ]
            rows = [
                (METHOD_LABELS[key], f"{value:.2f}")
                for key, value in zip(keys, drift.tolist(), strict=True)
            ]
            heading = f"attributions, drift (|map| Spearman with epoch {previous_epoch})"
            if settled is not None:
                verdict = (
                    f"explanations settled after epoch {settled} "
                    f"(every method >= {threshold:g} since)"
                )
                ctx.log(summary_block(heading, rows, verdict, None))
            else:
                ctx.log(
                    summary_block(
                        heading, rows, f"explanations still moving, below {threshold:g}", moving
                    )
                )
        for part, value in seconds.items():
            ctx.metrics[f"attributions/seconds/{part}"] = value

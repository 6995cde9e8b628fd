r"""Class model visualisation: the image the network finds most typical of each class.

Simonyan, Vedaldi & Zisserman 2013, "Deep Inside Convolutional Networks: Visualising Image
Classification Models and Saliency Maps" (arXiv:1312.6034), §2, eq. 1: for every class $c$,

$$ I_c = \arg\max_I \; S_c(I) - \lambda \lVert I \rVert_2^2 $$

where $S_c$ is the class's logit (the unnormalised score, not the softmax, which could be
raised by lowering the other classes) and $I$ the image in pixel intensities, so that the
regulariser pulls towards the blank (black) image the search starts from.

The decay is $\lambda$ in the centre of the image and `MARGIN_DECAY_FACTOR` (20) times
$\lambda$ in a margin of 15% of the side ($\lambda_j$ below), which keeps the class models
where the training digits are drawn (the central 20 x 20 pixels of MNIST's 28 x 28) instead of
filling the border with strokes: the objective is $S_c(I) - \sum_j \lambda_j I_j^2$, and
`margin=0` gives Simonyan's uniform decay.

The maximisation is projected, preconditioned gradient ascent, all classes in one batch:

$$
d_t = G_\sigma \ast \left( M^{-1} \nabla_I S_c(M I_t) - 2 \lambda_j I_t \right), \qquad
I_{t+1} = \mathrm{clip}_{[0, 1]} \left( I_t + \eta_t \frac{d_t}{\max_j |d_{t,j}|} \right),
\qquad \eta_t = \eta \, (1 - t / T)
$$

- $\nabla_I S_c$ comes from `exigo.analyses.saliency.input_gradients` (the input is
  normalised, so the chain rule divides by the normalisation's standard deviation).
- $M$: a random translation of at most `jitter` pixels and a random rotation of at most
  `rotation` degrees before each gradient, undone on the gradient after (transformation
  robustness, Olah et al. 2017, "Feature Visualization", Distill: features that only work at
  one exact position or slant are not drawn, so the image settles on one digit instead of a
  blend of several slants; the ascent climbs the score averaged over these small moves).
- $G_\sigma$: a Gaussian blur of the ascent direction (a preconditioner: it changes the path,
  not the maximiser; low spatial frequencies are climbed first, so the image grows thick
  strokes instead of pixel noise).
- The step is normalised by the direction's largest component (pixels pinned at a bound and
  pushed outward are left out), and decays linearly to 0 in $T$ steps: the step size does not
  depend on the scale of the model's gradients (only $\lambda$ weighs the decay against the
  logit).
- clip: intensities stay in the valid pixel range $[0, 1]$ (in normalised units:
  $[-\mu/\sigma, (1 - \mu)/\sigma]$).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from textwrap import wrap
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exigo._modes import frozen
from exigo.analyses._filters import gaussian_blur
from exigo.analyses.saliency import input_gradients
from exigo.analysis import Analysis, CostShape, EpochContext, FigureInfo
from exigo.data import Normalization, blank_image

if TYPE_CHECKING:
    from matplotlib.figure import Figure


__all__ = [
    "ClassModelAnalysis",
    "ClassModels",
    "choose_classes",
    "class_models",
    "plot_class_models",
]

#: How much stronger the decay is in the image's margin than in its centre.
MARGIN_DECAY_FACTOR = 20.0


@dataclass(frozen=True)
class ClassModels:
    """One optimised image per class.

    Attributes:
        pixels: float tensor [K, C, H, W], pixel intensities in [0, 1] (when clamped).
        images: float tensor [K, C, H, W], the same images as the model takes them (normalised).
        classes: int64 tensor [K], the class each image maximises.
        scores: float tensor [K], the class's logit $S_c(I_c)$.
        probabilities: float tensor [K], the class's softmax probability at $I_c$.
    """

    pixels: Tensor
    images: Tensor
    classes: Tensor
    scores: Tensor
    probabilities: Tensor


def _channel_stats(normalization: Normalization | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std as [1, C, 1, 1] tensors (0 and 1 without a normalisation)."""
    if normalization is not None:
        return normalization.stats(like)
    channels = like.shape[1]
    return like.new_zeros(1, channels, 1, 1), like.new_ones(1, channels, 1, 1)


def _rotate(images: Tensor, degrees: float) -> Tensor:
    """Rotate [K, C, H, W] images about their centre (bilinear, zeros outside)."""
    radians = math.radians(degrees)
    cos, sin = math.cos(radians), math.sin(radians)
    theta = images.new_tensor([[cos, -sin, 0.0], [sin, cos, 0.0]]).expand(images.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def _margin_weights(size: Sequence[int], margin: float, like: Tensor) -> Tensor:
    """Decay weight per pixel, [1, 1, H, W]: 1 inside, `MARGIN_DECAY_FACTOR` in the margin."""
    height, width = size
    weights = like.new_ones(1, 1, height, width)
    rows, columns = round(margin * height), round(margin * width)
    if margin > 0:
        weights[..., :rows, :] = MARGIN_DECAY_FACTOR
        weights[..., height - rows :, :] = MARGIN_DECAY_FACTOR
        weights[..., :, :columns] = MARGIN_DECAY_FACTOR
        weights[..., :, width - columns :] = MARGIN_DECAY_FACTOR
    return weights


def class_models(
    model: nn.Module,
    start: Tensor,
    classes: Tensor,
    *,
    normalization: Normalization | None = None,
    steps: int = 60,
    step_size: float = 0.08,
    l2: float = 0.03,
    margin: float = 0.15,
    jitter: int = 1,
    rotation: float = 20.0,
    smoothing: float = 1.5,
    pixel_range: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
) -> ClassModels:
    r"""Maximise $S_c(I) - \lambda \lVert I \rVert^2$ for every class at once (module docstring).

    The model is `frozen` (eval mode, no parameter gradients) while the images are optimised
    and comes back with its weights, mode and `requires_grad` flags unchanged.

    Args:
        model: classifier mapping [K, C, H, W] to logits [K, num_classes].
        start: float tensor [C, H, W] or [K, C, H, W], the image(s) to start from, as the
            model takes them (normalised); usually the blank image, `exigo.data.blank_image`.
        classes: int64 tensor [K], the class each image should maximise.
        normalization: how images are made from pixel intensities; the optimisation runs on
            intensities $I$ and feeds the model $(I - \mu) / \sigma$. None: the model's inputs
            are taken to be the intensities themselves.
        steps: gradient ascent steps $T$.
        step_size: $\eta$, the largest change of any pixel in the first step (intensity units).
        l2: $\lambda$, weight of $\lVert I \rVert^2$ (logit per squared intensity).
        margin: width of the image's margin, as a fraction of its height and width, where
            $\lambda$ is `MARGIN_DECAY_FACTOR` times larger (0: none). The default keeps the
            class models inside the central 20 x 20 pixels of a 28 x 28 image, where MNIST's
            digits are drawn.
        jitter: largest random shift in pixels before each gradient (0: none). The shift
            wraps around the border (a black border on MNIST).
        rotation: largest random rotation in degrees before each gradient (0: none).
        smoothing: $\sigma$ of the Gaussian blur of the ascent direction, in pixels (0: none).
        pixel_range: `(low, high)` intensities to clamp to; None: no clamping.
        seed: seeds the jitter.

    Returns:
        `ClassModels` on the start image's device.
    """
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    classes = classes.to(start.device, torch.long).flatten()
    if start.ndim == 3:
        start = start.unsqueeze(0)
    start = start.detach().expand(classes.shape[0], -1, -1, -1)
    mean, std = _channel_stats(normalization, start)
    pixels = (start * std + mean).clone()  # (K, C, H, W) intensities, optimised in place
    decay = 2 * l2 * _margin_weights(pixels.shape[-2:], margin, pixels)  # (1, 1, H, W)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
        angle = rotation * (2 * float(torch.rand((), generator=generator)) - 1)
        moved = torch.roll(pixels, (dy, dx), dims=(2, 3)) if jitter else pixels
        moved = _rotate(moved, angle) if rotation else moved
        gradient = input_gradients(model, (moved - mean) / std, classes)
        # back to the unmoved image's frame (the adjoint of the moves, up to interpolation)
        gradient = _rotate(gradient, -angle) if rotation else gradient
        if jitter:
            gradient = torch.roll(gradient, (-dy, -dx), dims=(2, 3))
        direction = gradient / std - decay * pixels  # d/dI of S_c - l2 |I|^2
        if smoothing > 0:
            direction = gaussian_blur(direction, smoothing)
        if pixel_range is not None:  # pinned pixels pushed outward do not move: ignore them
            low, high = pixel_range
            pinned = ((pixels <= low) & (direction < 0)) | ((pixels >= high) & (direction > 0))
            direction = direction.masked_fill(pinned, 0.0)
        largest = direction.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        pixels += step_size * (1 - step / steps) * direction / largest
        if pixel_range is not None:
            pixels.clamp_(*pixel_range)
    images = (pixels - mean) / std
    with frozen(model), torch.no_grad():
        logits = model(images).float()
    rows = torch.arange(classes.shape[0], device=logits.device)
    return ClassModels(
        pixels=pixels,
        images=images,
        classes=classes,
        scores=logits[rows, classes],
        probabilities=logits.softmax(1)[rows, classes],
    )


#: Inches per character at font size 9 (DejaVu Sans, with room for wide letters).
_CHARACTER_INCHES = 9 * 0.65 / 72


def plot_class_models(
    result: ClassModels,
    class_names: Sequence[str],
    *,
    title: str | None = None,
    selection: str = "",
    recall: Tensor | None = None,
) -> Figure:
    """One image per class, titled with the class and its softmax probability.

    Each image is shown from 0 (black) to its brightest value (white), so faint class models
    stay visible; grey for one channel, colour for three, with the same per-image scaling.
    The figure is at least 7 inches wide and its title and footnote are wrapped to that width,
    so neither is clipped whatever the number of classes; class names wider than their column
    are wrapped onto two lines.

    Args:
        result: the `ClassModels` to draw (any device).
        class_names: display name per class.
        title: figure title.
        selection: a sentence for the footnote saying which classes are shown and why, when
            they are not all of them.
        recall: float tensor [K], the held-out recall of each drawn class, written under its
            probability; None: not written.

    Returns:
        A matplotlib `Figure` (not attached to pyplot).
    """
    from matplotlib.figure import Figure

    pixels = result.pixels.detach().float().cpu()
    count = pixels.shape[0]
    columns = min(count, 10) or 1
    rows = max(1, math.ceil(count / columns))
    names = [class_names[int(c)] for c in result.classes]
    longest = max([len(name) for name in names] + [21 if recall is not None else 1])
    column_inches = min(max(1.3, (longest + 1) * _CHARACTER_INCHES + 0.1), 1.9)
    fig_width = max(column_inches * columns + 0.4, 7.0)
    title_lines = wrap(title or "Class models", int((fig_width - 0.4) / (11 * 0.65 / 72)))
    notes = [
        "Each image maximises its class's logit minus λ‖I‖² by gradient ascent from a blank "
        "image, with small random shifts and rotations and a blur at every step.",
        "p = softmax probability of that class. Each image is scaled to its brightest value.",
    ]
    if selection:
        notes.append(selection)
    characters = int((fig_width - 0.3) / (7.5 * 0.65 / 72))
    note_lines = [line for note in notes for line in wrap(note, characters)]
    figure = Figure(
        figsize=(
            fig_width,
            1.75 * rows + 0.35 + 0.22 * len(title_lines) + 0.15 * len(note_lines),
        ),
        layout="constrained",
    )
    axes = figure.subplots(rows, columns, squeeze=False)
    name_characters = max(4, int((column_inches - 0.1) / _CHARACTER_INCHES))
    for index, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if index >= count:
            ax.set_axis_off()
            continue
        image = pixels[index]
        brightest = float(image.max())
        image = image / brightest if brightest > 0 else image
        if image.shape[0] == 1:
            ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(image[:3].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        label = names[index]
        probability = f"p = {float(result.probabilities[index]):.2f}"
        if recall is not None:
            probability += f", recall {float(recall[index]):.2f}"
        if len(label) + 2 + len(probability) <= name_characters:
            ax.set_title(f"{label}: {probability}", fontsize=9)
        else:
            wrapped = wrap(label, name_characters) or [label]
            if len(wrapped) > 2:
                wrapped = [wrapped[0], wrapped[1][: name_characters - 1] + "…"]
            ax.set_title("\n".join([*wrapped, probability]), fontsize=9)
    figure.suptitle("\n".join(title_lines), fontsize=11)
    figure.supxlabel("\n".join(note_lines), fontsize=7.5, color="0.3")
    return figure


def choose_classes(
    num_classes: int, limit: int, recall: Tensor | None = None
) -> tuple[Tensor, str]:
    """Which classes a per-class figure shows, and the sentence that says why.

    Args:
        num_classes: C.
        limit: the most classes shown.
        recall: float tensor [C], each class's held-out recall, or None (before training).

    Returns:
        `(classes, reason)`: int64 tensor [min(C, limit)] and a sentence for the figure
        (empty when every class is shown). With recall: the `limit` classes of lowest recall,
        lowest first (ties by class index); without: the first `limit` classes.
    """
    if num_classes <= limit:
        return torch.arange(num_classes), ""
    if recall is None:
        return (
            torch.arange(limit),
            f"Shown: the first {limit} of {num_classes} classes.",
        )
    order = torch.sort(recall.detach().float().cpu(), stable=True).indices[:limit]
    return (
        order,
        f"Shown: the {limit} of {num_classes} classes with the lowest held-out recall, "
        "lowest first (the classes the network gets wrong most often).",
    )


class ClassModelAnalysis(Analysis):
    """Per-epoch hook: `plots/class_models_{epoch}.png`, one class model per class.

    The same jitter seed every epoch, so the epochs differ only by the model. Adds the mean
    softmax probability of the class models drawn to the metrics
    (`class_models/mean_probability`). With more than `max_classes` classes only that many
    are optimised and drawn: those of lowest held-out recall (`choose_classes`), as the
    figure says.

    Args:
        seed: seeds the jitter.
        max_classes: the most classes drawn (each costs `steps` forward-backward passes).
        **settings: keyword arguments of `class_models` (steps, step_size, l2, ...).
    """

    name = "class_models"
    figures = (
        FigureInfo(
            "class_models",
            "Class models",
            "Inputs optimised to maximise each class score: what the network looks for.",
        ),
    )

    def __init__(self, seed: int = 0, max_classes: int = 20, **settings: float) -> None:
        if max_classes < 1:
            raise ValueError(f"max_classes must be at least 1, got {max_classes}")
        self.seed = seed
        self.max_classes = max_classes
        self.settings = settings

    @property
    def steps(self) -> int:
        """Ascent steps at the pipeline's `scale` (the default 60 times it, at least 10)."""
        steps = int(self.settings.get("steps", 60))
        return steps if self.scale >= 1 else max(min(10, steps), round(steps * self.scale))

    def cost(self, shape: CostShape) -> float:
        """One forward-backward pass per class and step, and a forward pass per class.

        Args:
            shape: probe size, classes and image shape.

        Returns:
            $K (T + 1/3)$ passes per epoch.
        """
        return shape.num_classes * (self.steps + 1 / 3)

    def __call__(self, ctx: EpochContext) -> None:
        """Optimise one image per class from the blank image and save the figure."""
        blank = blank_image(ctx.normalization, ctx.probe.images[:1])  # (1, C, H, W)
        num_classes = len(ctx.class_names)
        recall = None
        if ctx.eval is not None and num_classes > self.max_classes:
            targets, predictions = ctx.eval.targets.cpu(), ctx.eval.predictions.cpu()
            support = torch.bincount(targets, minlength=num_classes)[:num_classes]
            hits = torch.bincount(targets[targets == predictions], minlength=num_classes)
            recall = hits[:num_classes] / support.clamp_min(1)
        classes, reason = choose_classes(num_classes, self.max_classes, recall)
        classes = classes.to(ctx.device)
        result = class_models(
            ctx.model,
            blank,
            classes,
            normalization=ctx.normalization,
            seed=self.seed,
            **{**self.settings, "steps": self.steps},
        )
        ctx.metrics["class_models/mean_probability"] = float(result.probabilities.mean())
        ctx.draw_figure(
            "class_models",
            plot_class_models,
            result,
            ctx.class_names,
            title=f"Class models: what the network finds most typical of each class, {ctx.when}",
            selection=reason,
            recall=None if recall is None else recall[classes.cpu()],
        )

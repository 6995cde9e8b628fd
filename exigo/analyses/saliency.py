r"""Saliency maps: where the network looks, relative to where it looks when shown nothing.

Vanilla gradient saliency (Simonyan, Vedaldi & Zisserman 2013, "Deep Inside Convolutional
Networks: Visualising Image Classification Models and Saliency Maps", arXiv:1312.6034, §3),
extended with a blank-image baseline. With $f_y$ the logit of the true class $y$, $x$ the
input image, $b$ the blank image (zero pixel intensity, normalised like the data) and $p(x)$
the input's pixel intensities in $[0, 1]$:

$$\text{source} = p(x), \qquad
\text{baseline} = \left| \nabla_x f_y(b) \right|, \qquad
\text{saliency} = \left| \nabla_x f_y(x) \right|,$$

$$\text{delta} = \nabla_x f_y(x) - \nabla_x f_y(b), \qquad
\text{overlay} = \text{delta} \odot \text{source}.$$

The baseline shows where the network looks when shown nothing (its prior for class $y$);
delta is the focus this particular image adds to it (signed: red raises $f_y$, blue lowers
it); overlay keeps only the part of delta that falls on ink, i.e. what the network used of
this image.

Computation: one batched forward/backward per chunk of images, with the parameters'
`requires_grad` switched off so only input gradients are computed. Samples are independent in
eval mode, so the gradient of $\sum_i f_{y_i}(x_i)$ with respect to the batch holds every
sample's own gradient. The blank baseline is the same image for every input, so its gradient
depends only on the class: it is computed once per distinct class, not once per image.

`input_gradients` is the one place in exigo that computes input gradients; the error and class
model analyses use it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from exigo._modes import frozen
from exigo.analysis import Analysis, CostShape, EpochContext, FigureInfo
from exigo.data import Normalization, blank_image, display_pixels
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
    "SaliencyAnalysis",
    "SaliencyMaps",
    "frozen",
    "input_gradients",
    "plot_saliency",
    "probe_note",
    "reduce_channels",
    "saliency_maps",
]

#: Images per forward/backward: 2,000 MNIST images in one batch fall out of the CPU's cache
#: and run 2.5x slower than in chunks of 128-256 (../shared/MEASURED.md).
DEFAULT_CHUNK_SIZE = 256

ROW_NAMES = ("source", "baseline", "saliency", "delta", "overlay")


@dataclass(frozen=True)
class SaliencyMaps:
    r"""The five maps of a batch, channels reduced; float tensors [N, H, W] on the input's device.

    Attributes:
        source: pixel intensities of the input in [0, 1].
        baseline: $|\nabla_x f_y(b)|$, the gradient magnitude at the blank image.
        saliency: $|\nabla_x f_y(x)|$, the gradient magnitude at the input.
        delta: $\nabla_x f_y(x) - \nabla_x f_y(b)$, signed.
        overlay: delta times source, signed.
        pixels: float tensor [N, C, H, W] in [0, 1], the input's pixel intensities with every
            channel (what the figure's source row shows: colour images in colour); None when
            made by hand without them (the figure then shows `source`).
    """

    source: Tensor
    baseline: Tensor
    saliency: Tensor
    delta: Tensor
    overlay: Tensor
    pixels: Tensor | None = None

    def rows(self) -> list[tuple[str, Tensor]]:
        """The five maps in figure order.

        Returns:
            `(name, float map [N, H, W])` pairs: source, baseline, saliency, delta, overlay.
        """
        return [(name, getattr(self, name)) for name in ROW_NAMES]


def input_gradients(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    r"""Gradient of each image's target logit with respect to that image, $\nabla_x f_t(x)$.

    Batched: one forward and one backward per chunk of `chunk_size` images, differentiating
    $\sum_i f_{t_i}(x_i)$ (samples are independent in eval mode). The model is `frozen` for the
    duration and comes back in the mode and with the `requires_grad` flags it had; no parameter
    `.grad` is touched. `images` are not modified.

    Args:
        model: classifier mapping [N, C, H, W] to logits [N, K].
        images: float tensor [N, C, H, W], as the model takes them, on the model's device.
        targets: int64 tensor [N], the class whose logit is differentiated for each image.
        chunk_size: images per forward/backward.

    Returns:
        Float tensor [N, C, H, W] on the images' device.
    """
    if images.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{images.shape[0]} images but {targets.shape[0]} targets: need one target per image"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    targets = targets.to(images.device, torch.long)
    gradients = torch.empty_like(images)
    with frozen(model), torch.enable_grad():
        for start in range(0, images.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            # a detached alias, not a copy: autograd never writes into its leaf's data
            leaf = images[chunk].detach().requires_grad_(True)
            logits = model(leaf)  # (B, K)
            score = logits.gather(1, targets[chunk, None]).sum()
            (gradients[chunk],) = torch.autograd.grad(score, leaf)
    return gradients


def reduce_channels(maps: Tensor) -> Tensor:
    """Keep, at every pixel, the channel of largest magnitude, with its sign.

    Args:
        maps: float tensor [N, C, H, W].

    Returns:
        Float tensor [N, H, W]; for C = 1 simply the only channel.
    """
    if maps.shape[1] == 1:
        return maps[:, 0]
    strongest = maps.abs().argmax(dim=1, keepdim=True)  # (N, 1, H, W)
    return maps.gather(1, strongest).squeeze(1)


def _baseline_gradients(
    model: nn.Module, baseline: Tensor, images: Tensor, labels: Tensor, chunk_size: int
) -> Tensor:
    r"""$\nabla_x f_y(b)$ for every image, [N, C, H, W]; once per class when b is shared."""
    shared = baseline.ndim < images.ndim or baseline.shape[0] == 1
    if not shared:
        per_image = baseline.to(images).broadcast_to(images.shape)
        return input_gradients(model, per_image, labels, chunk_size=chunk_size)
    single = baseline.to(images).broadcast_to((1, *images.shape[1:]))
    classes, position = torch.unique(labels, return_inverse=True)
    per_class = input_gradients(
        model, single.expand(classes.shape[0], -1, -1, -1), classes, chunk_size=chunk_size
    )
    return per_class[position]


def saliency_maps(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    baseline: Tensor | None = None,
    *,
    normalization: Normalization | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SaliencyMaps:
    r"""Source, baseline, saliency, delta and overlay maps of a batch (see the module docstring).

    Works for any `nn.Module` classifier mapping images to logits. The gradients are taken in
    eval mode with the parameters frozen (`frozen`); the model comes back in the mode and
    with the `requires_grad` flags it had, with no `.grad` added. `images`, `labels` and
    `baseline` are not modified.

    Multi-channel images are reduced to one map per image by keeping, at every pixel, the
    channel of largest magnitude (`reduce_channels`): the signed value for delta and overlay,
    the magnitude for baseline and saliency, the brightest channel for source. Delta and
    overlay are computed per channel before the reduction. `pixels` keeps every channel, so
    the figure shows colour images in colour.

    Args:
        model: classifier mapping [N, C, H, W] to logits [N, K].
        images: float tensor [N, C, H, W], as the model takes them (normalised), on the model's
            device.
        labels: int64 tensor [N], the class $y$ whose logit is explained (usually the true
            label).
        baseline: float tensor broadcastable to `images`: the reference input $b$. Default: the
            blank image, `exigo.data.blank_image` (zero pixel intensity, normalised), or
            all zeros when `normalization` is None. A baseline without a batch dimension (or
            with batch size 1) is shared by all images, and its gradient is computed once per
            distinct label.
        normalization: how `images` were made from pixel intensities; builds the blank image
            and maps `source` back to [0, 1]. None: the inputs are taken as they are, the blank
            is the all-zero input and `source` is each image min-max stretched to [0, 1].
        chunk_size: images per forward/backward (keeps large batches in cache).

    Returns:
        `SaliencyMaps`, each float [N, H, W] on the images' device.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"labels must be [N] with N={images.shape[0]}, got shape {tuple(labels.shape)}"
        )
    if baseline is None:
        baseline = blank_image(normalization, images)
    pixels = display_pixels(images.detach(), normalization)  # (N, C, H, W)
    at_image = input_gradients(model, images, labels, chunk_size=chunk_size)
    at_baseline = _baseline_gradients(model, baseline, images, labels, chunk_size)
    delta = at_image - at_baseline
    return SaliencyMaps(
        source=reduce_channels(pixels),
        baseline=reduce_channels(at_baseline).abs(),
        saliency=reduce_channels(at_image).abs(),
        delta=reduce_channels(delta),
        overlay=reduce_channels(delta * pixels),
        pixels=pixels,
    )


def plot_saliency(
    maps: SaliencyMaps,
    labels: Sequence[int] | Tensor,
    predictions: Sequence[int] | Tensor,
    class_names: Sequence[str],
    *,
    title: str | None = None,
    columns_note: str = "",
) -> Figure:
    """Draw the five maps: one row per map, one column per image.

    Colour scales are shared along each row, so the columns compare: source as it is (grey or
    colour, from `maps.pixels`),
    baseline and saliency in one sequential scale (both are gradient magnitudes), delta and
    overlay each in a diverging scale centred at 0 with symmetric limits (red raises the true
    class's logit, blue lowers it). Gradient scales end at the 99.5th percentile of the row
    (`exigo.figures.colour_scale`) so that a few hot pixels do not wash out the rest; a grey line
    over the delta row marks the object's outline where that is meaningful
    (`exigo.figures.tiles.object_outline`: one channel, dark background), and the footnote
    says so. For colour images the footnote says how the maps combine the channels, and the
    overlay row is drawn over the image washed out to half its contrast (`TileRow.backdrop`:
    the map covers it where |overlay| nears the scale's end). Each
    column is headed by its true and predicted label (in red when they differ). The maps are
    drawn as one picture (`exigo.figures.tiles`), five times faster than an Axes per map.

    Args:
        maps: the `SaliencyMaps` of N images (any device).
        labels: N true class indices.
        predictions: N predicted class indices.
        class_names: display name per class.
        title: figure title.
        columns_note: a sentence for the footnote saying which images the columns are (and
            why those, when they are not every class).

    Returns:
        A matplotlib `Figure` (not attached to pyplot).
    """
    labels = [int(label) for label in torch.as_tensor(labels).flatten()]
    pixels = (
        maps.pixels.detach().float().cpu().numpy()
        if maps.pixels is not None
        else maps.source.detach().float().cpu().numpy()[:, None]
    )  # (N, C, H, W)
    outline = object_outline(pixels)
    channels = pixels.shape[1]
    predictions = [int(p) for p in torch.as_tensor(predictions).flatten()]
    magnitude_limit = colour_limit(maps.baseline, maps.saliency)
    delta_limit = colour_limit(maps.delta)
    overlay_limit = colour_limit(maps.overlay)
    values = {name: tensor.detach().float().cpu().numpy() for name, tensor in maps.rows()}
    rows = [
        TileRow("source\nimage", display_tiles(pixels)),
        *(
            TileRow(
                label,
                values[name],
                "viridis",
                (0.0, magnitude_limit),
                bar=True,
                clipped=(False, True),
            )
            for name, label in (
                ("baseline", "baseline\n|∇f(blank)|"),
                ("saliency", "saliency\n|∇f(x)|"),
            )
        ),
        TileRow(
            "delta\n∇f(x) − ∇f(blank)",
            values["delta"],
            "RdBu_r",
            (-delta_limit, delta_limit),
            bar=True,
            clipped=(True, True),
            outline=outline,
        ),
        TileRow(
            "overlay\ndelta × source",
            values["overlay"],
            "RdBu_r",
            (-overlay_limit, overlay_limit),
            bar=True,
            clipped=(True, True),
            # colour images stay in colour beneath the map (grey ones as before: white ground)
            # washed out (half-way to white), so no image colour passes for the map's
            backdrop=0.5 + 0.5 * display_tiles(pixels) if channels > 1 else None,
        ),
    ]
    block = TileBlock(
        rows,
        column_labels=[
            f"true {class_names[truth]}\npred {class_names[guess]}"
            for truth, guess in zip(labels, predictions, strict=True)
        ],
        column_colours=[
            "black" if truth == guess else "tab:red"
            for truth, guess in zip(labels, predictions, strict=True)
        ],
    )
    notes = [
        "f = logit of the true class, blank = image of zero intensity.  delta and overlay: red "
        "raises f, blue lowers it"
        + ("; grey line: the object's outline (intensity 0.5)." if outline is not None else ".")
    ]
    if channels > 1:
        notes.append(
            f"Maps: at every pixel, the largest |value| over the {channels} channels (signed "
            "for delta and overlay); overlay = delta × intensity per channel, then combined, "
            "drawn over the image washed out to half its contrast, opaque where |overlay| "
            "reaches the scale's end."
        )
    notes.append(
        "Colour scales are shared along each row and clipped at the "
        f"{100 * ROBUST_QUANTILE:g}th percentile (≥, ≤ at the bar's ends)."
    )
    if columns_note:
        notes.append(columns_note)
    return tile_figure([block], title or "Saliency towards the true class", "\n".join(notes))


def probe_note(labels: Tensor, num_classes: int) -> str:
    """The footnote sentence that says which images the probe figures show, and why.

    Args:
        labels: int64 tensor [P], the probe images' classes (`exigo.analysis.select_probe`).
        num_classes: C.

    Returns:
        One sentence.
    """
    shown = len(set(labels.flatten().tolist()))
    if shown >= num_classes:
        return "Columns: the fixed probe images, the first validation image(s) of every class."
    return (
        f"Columns: the fixed probe, the first validation image of each of the first {shown} of "
        f"{num_classes} classes (in class order; the same images every epoch)."
    )


class SaliencyAnalysis(Analysis):
    """Per-epoch hook: the five maps of the fixed probe images, `plots/saliency_{epoch}.png`.

    Also called before training (`saliency_init.png`), so the untrained and trained network
    can be compared. Predictions come from the evaluation pass (before training: from one
    forward pass over the probe).
    """

    name = "saliency"
    figures = (
        FigureInfo(
            "saliency",
            "Saliency maps",
            "Which pixels of the fixed probe images the class score is most sensitive to.",
        ),
    )
    before_training = True

    def cost(self, shape: CostShape) -> float:
        r"""One gradient per probe image, and one per distinct class at the blank image.

        Args:
            shape: probe size, classes and image shape.

        Returns:
            $P + \min(P, K)$ passes per epoch (its settings do not scale).
        """
        return shape.probe_images + min(shape.probe_images, shape.num_classes)

    def __call__(self, ctx: EpochContext) -> None:
        """Compute the probe's maps and save the figure."""
        probe = ctx.probe
        maps = saliency_maps(ctx.model, probe.images, probe.labels, normalization=ctx.normalization)
        if ctx.eval is not None:
            predictions = ctx.eval.predictions[probe.indices.cpu()]
        else:
            with torch.no_grad():
                predictions = ctx.model(probe.images).argmax(1).cpu()
        ctx.draw_figure(
            "saliency",
            plot_saliency,
            maps,
            probe.labels.cpu(),
            predictions,
            ctx.class_names,
            title=f"Saliency towards the true class, {ctx.when}",
            columns_note=probe_note(probe.labels, len(ctx.class_names)),
        )

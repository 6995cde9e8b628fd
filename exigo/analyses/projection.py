r"""Where the validation images sit in the model's embedding space, epoch after epoch.

The same fixed validation points are shown two ways after every epoch:

- in TensorBoard's embedding projector (`tensorboard --logdir save/logs`, tab "Projector"):
  the embeddings $z_i \in \mathbb{R}^D$ (the input of the classifier layer), with metadata
  columns `label`, `predicted`, `correct` and each point drawn as its image (a sprite);
- as a t-SNE picture `plots/tsne_{epoch}.png` that needs no browser.

t-SNE (van der Maaten & Hinton, 2008) turns distances between embeddings into neighbour
probabilities and looks for 2-D positions $y_i$ whose heavy-tailed neighbour probabilities
match them:

$$ p_{j|i} = \frac{\exp(-\lVert z_i - z_j \rVert^2 / 2\sigma_i^2)}
               {\sum_{k \ne i} \exp(-\lVert z_i - z_k \rVert^2 / 2\sigma_i^2)}, \qquad
   p_{ij} = \frac{p_{j|i} + p_{i|j}}{2K}, \qquad
   q_{ij} = \frac{(1 + \lVert y_i - y_j \rVert^2)^{-1}}
               {\sum_{k \ne l} (1 + \lVert y_k - y_l \rVert^2)^{-1}}, $$

$$ \min_{y} \; \mathrm{KL}(P \,\Vert\, Q) = \sum_{i \ne j} p_{ij} \log \frac{p_{ij}}{q_{ij}}, $$

with each bandwidth $\sigma_i$ chosen so that the perplexity $2^{H(P_i)}$ of point $i$'s
neighbour distribution equals a set value (30 by default: about 30 effective neighbours).
The layout keeps neighbourhoods, not distances; its axes have no units. The optimisation is
openTSNE's (Poličar, Stražar & Zupan, 2024, J. Stat. Softw. 109(3)): exact nearest neighbours,
Barnes-Hut gradients, a PCA start and an early-exaggeration phase on the first epoch; every
later epoch starts from the previous epoch's layout and skips the exaggeration, so clusters
move rather than jump (`bench/tsne.py` measures why).

References:
    L. van der Maaten and G. Hinton, "Visualizing Data using t-SNE", JMLR 9:2579-2605, 2008.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from exigo._io import atomic_write, atomic_write_bytes
from exigo._system import available_cpus
from exigo.analyses._random import numpy_seed
from exigo.analysis import Analysis, EpochContext, FigureInfo
from exigo.data import display_pixels, gather
from exigo.figures.pool import Drawn

if TYPE_CHECKING:
    from matplotlib.figure import Figure


__all__ = [
    "MIN_TSNE_POINTS",
    "PROJECTOR_TAG",
    "ProjectionAnalysis",
    "draw_tsne",
    "effective_perplexity",
    "plot_tsne",
    "projector_metadata",
    "sprite_images",
    "sprite_sheet",
    "stratified_indices",
    "tsne_layout",
    "write_projector",
    "write_sprite",
]

#: t-SNE needs a perplexity of at least 1, hence 3 neighbours per point, hence 4 points.
MIN_TSNE_POINTS = 4

#: Name of the embedding in TensorBoard's projector (`validation:00002` at epoch 2).
PROJECTOR_TAG = "validation"

#: TensorBoard's projector refuses sprites larger than this many pixels per side.
_MAX_SPRITE_SIDE = 8192


def stratified_indices(targets: Tensor, limit: int, seed: int) -> Tensor:
    """At most `limit` positions, stratified by class: each class in proportion to its size.

    Class `c` with `n_c` of the `N` points gets `floor(n_c * limit / N)` places; the places
    left over go to the classes with the largest remainders `(n_c * limit) mod N` (ties: the
    smaller class label first). Integer arithmetic, so the counts are exact. Within a class the
    points are drawn at random with a generator seeded by `seed`, so the same targets and seed
    always give the same points.

    Args:
        targets: int64 tensor [N], class labels.
        limit: the most points wanted; 0 gives none, `limit >= N` gives all.
        seed: seed of the draw within each class.

    Returns:
        int64 tensor [min(limit, N)] of positions in `targets`, ascending.
    """
    if limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")
    total = targets.numel()
    if limit >= total:
        return torch.arange(total, dtype=torch.long)
    if limit == 0:
        return torch.empty(0, dtype=torch.long)
    classes, counts = torch.unique(targets, return_counts=True)  # classes ascending
    places = counts * limit // total
    remainders = counts * limit % total
    short = limit - int(places.sum())
    # stable sort: equal remainders keep ascending class order
    order = torch.sort(-remainders, stable=True).indices
    places[order[:short]] += 1
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label, wanted in zip(classes.tolist(), places.tolist(), strict=True):
        members = torch.nonzero(targets == label).flatten()
        draw = torch.randperm(members.numel(), generator=generator)[:wanted]
        chosen.append(members[draw])
    return torch.cat(chosen).sort().values


def effective_perplexity(num_points: int, perplexity: float) -> float:
    """The perplexity t-SNE can use on `num_points` points: at most `(num_points - 1) / 3`.

    Each point's neighbour distribution is computed over its `3 * perplexity` nearest
    neighbours (the rule of van der Maaten's bhtsne and openTSNE), so there must be that many
    other points.

    Args:
        num_points: K, the number of points to lay out.
        perplexity: the perplexity wanted (positive).

    Returns:
        `min(perplexity, (K - 1) / 3)`, at least 1.

    Raises:
        ValueError: fewer than `MIN_TSNE_POINTS` points, or a non-positive perplexity.
    """
    if not perplexity > 0:
        raise ValueError(f"perplexity must be positive, got {perplexity}")
    if num_points < MIN_TSNE_POINTS:
        raise ValueError(
            f"t-SNE needs at least {MIN_TSNE_POINTS} points (a perplexity of 1 needs 3 "
            f"neighbours per point), got {num_points}"
        )
    return min(float(perplexity), (num_points - 1) / 3)


def tsne_layout(
    embeddings: Tensor,
    initialization: Tensor | None = None,
    perplexity: float = 30.0,
    seed: int = 0,
    *,
    n_iter: int | None = None,
    early_exaggeration_iter: int | None = None,
    learning_rate: float | None = None,
    negative_gradient_method: str = "bh",
    theta: float = 0.65,
    neighbors: str = "exact",
    n_jobs: int | None = None,
) -> Tensor:
    """A 2-D t-SNE layout of `embeddings` (openTSNE), optionally continuing a previous layout.

    Without `initialization`: PCA start (scaled to standard deviation 1e-4; a random start of
    the same scale when all embeddings are identical), 100 iterations of early exaggeration
    (factor 12, momentum 0.5), then 150 plain iterations (momentum 0.8): a third of openTSNE's
    250 + 500, which on MNIST embeddings leaves the neighbour preservation and the
    nearest-neighbour label accuracy unchanged (KL divergence 7% higher) and keeps 2,000
    points near 2 s on one core (`bench/tsne.py`).
    With `initialization` (the previous epoch's layout of the same points): the layout is
    taken as it is and only 100 plain iterations run, with twice openTSNE's learning rate
    (2 K instead of K), which keeps clusters where they were unless the embeddings moved them:
    on MNIST, points move a twentieth as far as with a fresh start, neighbours are preserved
    as well and the KL divergence is 7% higher (`bench/tsne.py`). Against 150 iterations at
    openTSNE's rate, the schedule of earlier versions: a third less CPU (0.98 s instead of
    1.46 s on 2,000 MNIST points), the same KL divergence (0.837 against 0.835), neighbour
    preservation (0.518 both) and label accuracy, and points move 9% less (`bench/tsne.py
    --only warm`; likewise on 1,000 and 2,000 points of 3- and 100-class colour images).
    Barnes-Hut gradients treat a cell of points as one point at its centre of mass when the
    cell's size over its distance is below `theta`. 0.65 instead of openTSNE's 0.5, on 2,000
    MNIST points: 18% less CPU for the first epoch's step and 14% for a later one (the
    neighbour search does not change), the same nearest-neighbour label accuracy (0.973-0.975
    against 0.974-0.976), at most 0.3 points less neighbour preservation, a 2% higher KL
    divergence and the same movement between epochs; 0.8 saves 24% and 17% but moves points
    9% farther between epochs (`bench/tsne.py --only theta`).
    The perplexity is lowered to what `K` points allow (`effective_perplexity`). The result
    depends only on the inputs and `seed` (exact neighbours, Barnes-Hut gradients computed
    point by point, whatever `n_jobs`).

    Args:
        embeddings: float tensor [K, D], K >= `MIN_TSNE_POINTS`. Not modified.
        initialization: float tensor [K, 2] to start from, or None for a PCA start.
        perplexity: wanted perplexity (effective number of neighbours).
        seed: seeds the PCA jitter, the random start and the approximate neighbour search;
            any seed the run takes (`exigo.analyses._random.numpy_seed` folds it into
            numpy's range).
        n_iter: iterations after the exaggeration phase; None: 150 without `initialization`,
            100 with it.
        early_exaggeration_iter: iterations of the exaggeration phase; None: 100 without
            `initialization`, 0 with it.
        learning_rate: the step of the plain iterations; None: openTSNE's `K` without
            `initialization`, `2 K` with it. The exaggeration phase always takes openTSNE's
            `K / 12`.
        negative_gradient_method: `"bh"` (Barnes-Hut, faster below ~10,000 points) or `"fft"`.
        theta: the Barnes-Hut angle (0: exact repulsion; larger: coarser and faster); not used
            by `"fft"`.
        neighbors: openTSNE's neighbour search, `"exact"` or `"annoy"`.
        n_jobs: threads openTSNE may use; None: half the CPUs this process may run on (its
            threads wait for each other every iteration, so on a busy machine more threads
            are slower: 3x with 2 threads on 2 shared cores, `bench/tsne.py`).

    Returns:
        float32 tensor [K, 2] on the CPU.

    Raises:
        ValueError: too few points, or `initialization` of the wrong shape.
    """
    from openTSNE import TSNEEmbedding, affinity
    from openTSNE import initialization as openTSNE_init

    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [K, D], got shape {tuple(embeddings.shape)}")
    seed = numpy_seed(seed)  # scikit-learn's PCA and openTSNE take [0, 2**32)
    num_points = embeddings.shape[0]
    used_perplexity = effective_perplexity(num_points, perplexity)
    data = embeddings.detach().to("cpu", torch.float64).numpy()
    if n_jobs is None:
        n_jobs = max(1, available_cpus() // 2)
    affinities = affinity.PerplexityBasedNN(
        data,
        perplexity=used_perplexity,
        method=neighbors,
        n_jobs=n_jobs,
        random_state=seed,
    )
    if initialization is None:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            start = openTSNE_init.pca(data, n_components=2, random_state=seed)
        if not np.isfinite(start).all():  # identical embeddings have no principal direction
            start = openTSNE_init.random(data, n_components=2, random_state=seed)
        warm = False
    else:
        if tuple(initialization.shape) != (num_points, 2):
            raise ValueError(
                f"initialization must be [{num_points}, 2], got {tuple(initialization.shape)}"
            )
        start = initialization.detach().to("cpu", torch.float64).numpy().copy()
        warm = True
    if early_exaggeration_iter is None:
        early_exaggeration_iter = 0 if warm else 100
    if n_iter is None:
        n_iter = 100 if warm else 150
    if learning_rate is None:
        learning_rate = 2.0 * num_points if warm else float(num_points)
    layout = TSNEEmbedding(
        start,
        affinities,
        negative_gradient_method=negative_gradient_method,
        theta=theta,
        n_jobs=n_jobs,
        random_state=seed,
    )
    if early_exaggeration_iter > 0:
        layout = layout.optimize(
            n_iter=early_exaggeration_iter, exaggeration=12, momentum=0.5, inplace=True
        )
    if n_iter > 0:
        layout = layout.optimize(
            n_iter=n_iter, momentum=0.8, learning_rate=learning_rate, inplace=True
        )
    return torch.from_numpy(np.asarray(layout, dtype=np.float32).copy())


def projector_metadata(
    targets: Tensor, predictions: Tensor, class_names: Sequence[str]
) -> list[list[str]]:
    """Rows of the projector's metadata table: `[label, predicted, correct]` per point.

    Args:
        targets: int64 tensor [K], true classes.
        predictions: int64 tensor [K], predicted classes.
        class_names: display name per class.

    Returns:
        K rows of three strings: true class name, predicted class name, `"yes"` or `"no"`.
    """
    return [
        [class_names[true], class_names[predicted], "yes" if true == predicted else "no"]
        for true, predicted in zip(targets.tolist(), predictions.tolist(), strict=True)
    ]


def sprite_images(pixels: Tensor) -> Tensor:
    """Thumbnails TensorBoard can tile into one sprite: square, 1 or 3 channels, small enough.

    TensorBoard tiles K thumbnails into a square of `ceil(sqrt(K))` per side and assumes square
    thumbnails; its projector rejects sprites over 8192 pixels per side. Non-square images are
    padded with black, images with neither 1 nor 3 channels become grey (channel mean), and
    thumbnails shrink (area averaging) until the sprite fits.

    Args:
        pixels: float tensor [K, C, H, W] in [0, 1]. Not modified.

    Returns:
        Float tensor [K, 1 or 3, S, S] in [0, 1].
    """
    thumbs = pixels.detach().float().cpu()
    if thumbs.shape[1] not in (1, 3):
        thumbs = thumbs.mean(dim=1, keepdim=True)
    height, width = thumbs.shape[-2:]
    if height != width:
        side = max(height, width)
        thumbs = F.pad(thumbs, (0, side - width, 0, side - height))
    side = _thumbnail_side(thumbs.shape[0], thumbs.shape[-1])
    if side != thumbs.shape[-1]:
        thumbs = F.interpolate(thumbs, size=(side, side), mode="area")
    return thumbs.clamp(0, 1)


def _thumbnail_side(count: int, side: int) -> int:
    """Largest thumbnail side <= `side` whose `ceil(sqrt(count))`-wide tiling fits a sprite."""
    per_row = math.ceil(math.sqrt(max(count, 1)))
    return max(1, min(side, _MAX_SPRITE_SIDE // per_row))


def sprite_sheet(thumbnails: Tensor) -> np.ndarray:
    """Tile thumbnails into TensorBoard's sprite: a square, `ceil(sqrt(K))` thumbnails a side.

    Row-major, the first thumbnail top left, black where the square has no thumbnail (the
    layout TensorBoard's projector expects, as torch's `add_embedding` writes it); tiled by
    `torchvision.utils.make_grid`.

    Args:
        thumbnails: float tensor [K, 1 or 3, S, S] in [0, 1] (`sprite_images`).

    Returns:
        uint8 array [n S, n S, 3], n = ceil(sqrt(K)).
    """
    from torchvision.utils import make_grid

    thumbnails = thumbnails.detach().float().cpu()
    count = thumbnails.shape[0]
    per_row = math.ceil(math.sqrt(max(count, 1)))
    blanks = thumbnails.new_zeros(per_row * per_row - count, *thumbnails.shape[1:])
    grid = make_grid(torch.cat([thumbnails, blanks]), nrow=per_row, padding=0)  # (3, nS, nS)
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def write_sprite(log_dir: Path, sprites: Tensor, tag: str = PROJECTOR_TAG) -> str:
    """Write the sprite of the projected points once, for every epoch's projector entry.

    Args:
        log_dir: the run's TensorBoard folder.
        sprites: float tensor [K, 1 or 3, S, S] in [0, 1] (`sprite_images`).
        tag: the embedding's name.

    Returns:
        The sprite's path relative to `log_dir`, as `write_projector` takes it.
    """
    from PIL import Image

    name = f"{tag}_sprite.png"
    sheet = Image.fromarray(sprite_sheet(sprites))
    # zlib level 3: half the encoding time of the default 6 on 2,000 MNIST thumbnails, and a
    # smaller file (542 KiB against 649)
    atomic_write(log_dir / name, lambda handle: sheet.save(handle, "png", compress_level=3))
    return name


def write_projector(
    log_dir: Path,
    embeddings: Tensor,
    metadata: list[list[str]],
    step: int,
    sprite: str,
    sprite_side: int,
    tag: str = PROJECTOR_TAG,
) -> None:
    """Add one epoch's embedding to TensorBoard's projector (`{log_dir}/{step:05d}/{tag}/`).

    Writes the files torch's `SummaryWriter.add_embedding` writes (`tensors.tsv`,
    `metadata.tsv`, an entry in `projector_config.pbtxt`), faster: the tensor with numpy
    (`%.9g`, which gives every float32 back exactly) and the sprite once per run
    (`write_sprite`) rather than every epoch, 0.5 s an epoch less for 2,000 points. The
    config is read from disk and rewritten atomically, so a resumed run keeps the earlier
    epochs, and an epoch run again after a crash replaces its entry instead of repeating it.

    Args:
        log_dir: the run's TensorBoard folder.
        embeddings: float tensor [K, D].
        metadata: K rows `[label, predicted, correct]` (`projector_metadata`).
        step: the epoch.
        sprite: the sprite's path relative to `log_dir` (`write_sprite`).
        sprite_side: pixels a side of one thumbnail in the sprite.
        tag: the embedding's name; TensorBoard shows `{tag}:{step:05d}`.
    """
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    folder = f"{step:05d}/{tag}"
    values = embeddings.detach().float().cpu().numpy()
    # atomically: a full disk leaves the previous file or none, never rows cut short
    atomic_write(
        log_dir / folder / "tensors.tsv",
        lambda handle: np.savetxt(handle, values, fmt="%.9g", delimiter="\t"),
    )
    table = ["label\tpredicted\tcorrect", *("\t".join(row) for row in metadata)]
    atomic_write_bytes(log_dir / folder / "metadata.tsv", ("\n".join(table) + "\n").encode())

    config = ProjectorConfig()
    on_disk = log_dir / "projector_config.pbtxt"
    if on_disk.exists():
        text_format.Parse(on_disk.read_text(), config)
    name = f"{tag}:{step:05d}"
    kept = [entry for entry in config.embeddings if entry.tensor_name != name]
    del config.embeddings[:]
    config.embeddings.extend(kept)
    entry = config.embeddings.add()
    entry.tensor_name = name
    entry.tensor_path = f"{folder}/tensors.tsv"
    entry.metadata_path = f"{folder}/metadata.tsv"
    entry.sprite.image_path = sprite
    entry.sprite.single_image_dim.extend([sprite_side, sprite_side])
    atomic_write_bytes(on_disk, text_format.MessageToString(config).encode())


def _class_colours(num_classes: int) -> list[Any]:
    from matplotlib import colormaps

    if num_classes <= 10:
        return [colormaps["tab10"](c) for c in range(num_classes)]
    if num_classes <= 20:
        return [colormaps["tab20"](c) for c in range(num_classes)]
    return [colormaps["turbo"](c / max(num_classes - 1, 1)) for c in range(num_classes)]


def plot_tsne(
    layout: Tensor,
    targets: Tensor,
    predictions: Tensor,
    class_names: Sequence[str],
    *,
    epoch: int,
    perplexity: float,
    continued: bool = False,
) -> Figure:
    """Draw a t-SNE layout: one colour per true class, misclassified points ringed in black.

    Args:
        layout: float tensor [K, 2].
        targets: int64 tensor [K], true classes.
        predictions: int64 tensor [K], predicted classes.
        class_names: display name per class.
        epoch: the epoch, for the title.
        perplexity: the perplexity used, for the caption.
        continued: the layout started from the previous epoch's (for the caption).

    Returns:
        A matplotlib Figure (not attached to pyplot).
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    points = layout.detach().cpu().numpy()
    true = targets.cpu().numpy()
    wrong = (targets != predictions).cpu().numpy()
    colours = _class_colours(len(class_names))
    size = float(min(60.0, max(4.0, 16_000 / max(len(points), 1))))

    figure = Figure(figsize=(8.2, 6.6))
    axes = figure.add_axes((0.03, 0.09, 0.72, 0.80))
    for label, colour in enumerate(colours):
        members = true == label
        if members.any():
            axes.scatter(
                points[members, 0],
                points[members, 1],
                s=size,
                color=colour,
                linewidths=0,
                alpha=0.85,
                rasterized=True,
            )
    if wrong.any():  # drawn again on top: larger, in the true class' colour, ringed in black
        axes.scatter(
            points[wrong, 0],
            points[wrong, 1],
            s=size * 4,
            color=[colours[label] for label in true[wrong]],
            edgecolors="black",
            linewidths=1.1,
            zorder=3,
        )
    axes.set_aspect("equal", adjustable="datalim")
    axes.set_xticks([])
    axes.set_yticks([])

    present = sorted(set(true.tolist()))
    if len(class_names) <= 20:
        handles = [
            Line2D([], [], linestyle="", marker="o", markersize=7, color=colours[c])
            for c in present
        ]
        labels = [str(class_names[c]) for c in present]
        handles.append(
            Line2D(
                [],
                [],
                linestyle="",
                marker="o",
                markersize=9,
                markerfacecolor="white",
                markeredgecolor="black",
                markeredgewidth=1.1,
            )
        )
        labels.append("misclassified\n(fill: true class)")
        figure.legend(
            handles,
            labels,
            title="true class",
            loc="center left",
            bbox_to_anchor=(0.76, 0.5),
            frameon=False,
        )
    errors = int(wrong.sum())
    axes.set_title(
        f"t-SNE of the validation embeddings, epoch {epoch}\n"
        f"{len(points):,} points, {errors:,} misclassified ({errors / max(len(points), 1):.1%},"
        " ringed)",
        fontsize=11,
    )
    start = "the previous epoch's layout" if continued else "PCA of the embeddings"
    figure.text(
        0.03,
        0.03,
        f"t-SNE (perplexity {perplexity:.3g}) keeps neighbourhoods, not distances: the axes, "
        f"cluster sizes and gaps\nbetween clusters have no units. This layout started from "
        f"{start}.",
        fontsize=8,
        color="dimgray",
        va="bottom",
    )
    return figure


def draw_tsne(
    embeddings: Tensor,
    previous: Tensor | None,
    targets: Tensor,
    predictions: Tensor,
    class_names: Sequence[str],
    *,
    epoch: int,
    perplexity: float,
    seed: int,
) -> Drawn:
    """`tsne_layout` then `plot_tsne`: one job for the pipeline's figure helper process.

    Args:
        embeddings: float tensor [K, D].
        previous: float tensor [K, 2], the previous epoch's layout to start from, or None.
        targets: int64 tensor [K], true classes.
        predictions: int64 tensor [K], predicted classes.
        class_names: display name per class.
        epoch: the epoch, for the title.
        perplexity: the perplexity to use (`effective_perplexity` of K points).
        seed: seeds the t-SNE.

    Returns:
        The figure, and the layout (float tensor [K, 2]) as the value.
    """
    layout = tsne_layout(embeddings, previous, perplexity, seed=seed)
    figure = plot_tsne(
        layout,
        targets,
        predictions,
        class_names,
        epoch=epoch,
        perplexity=perplexity,
        continued=previous is not None,
    )
    return Drawn(figure, layout)


class ProjectionAnalysis(Analysis):
    """Per epoch: the projector embedding in TensorBoard and `plots/tsne_{epoch}.png`.

    The points (at most `limit`, stratified by class) are drawn once from
    the first evaluation and kept, so a reader can follow one point across epochs. Each
    epoch's t-SNE starts from the previous epoch's layout. Nothing runs when the limit is 0.
    The t-SNE and its figure are one `draw_tsne` job: in the pipeline's figure helper process
    when there is one, so the other analyses go on meanwhile; the new layout reaches
    `self.layout` when the pipeline collects the figure, before it commits the epoch.

    Args:
        limit: at most this many held-out points (`--projection-limit`; 0: nothing runs).
        seed: seeds the choice of points and the t-SNE.
        perplexity: wanted t-SNE perplexity; lowered automatically for few points.
    """

    name = "projection"
    figures = (
        FigureInfo(
            "tsne",
            "t-SNE of the embeddings",
            "The held-out images' embeddings in 2-D; each epoch's layout starts from the "
            "previous one, so points that move have changed their neighbours.",
        ),
    )
    worker_imports = ("openTSNE",)  # 1 s, imported by the figure worker while epoch 1 trains

    def __init__(self, limit: int = 2000, seed: int = 0, perplexity: float = 30.0) -> None:
        self.limit = limit
        self.seed = seed
        self.perplexity = perplexity
        self.indices: Tensor | None = None
        self.layout: Tensor | None = None
        self._sprite: tuple[str, int] | None = None  # path in the log folder, side
        self._said: set[str] = set()

    def state_dict(self) -> dict[str, Tensor]:
        """The chosen points and the last layout (empty tensors before the first epoch).

        Returns:
            `indices`: int64 [P], the validation images projected; `layout`: float [P, 2], the
            last t-SNE layout (copies, on the CPU).
        """
        return {
            "indices": (
                self.indices.clone()
                if self.indices is not None
                else torch.empty(0, dtype=torch.long)
            ),
            "layout": self.layout.clone() if self.layout is not None else torch.empty(0, 2),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what `state_dict` returned (to continue a resumed run's layouts).

        Args:
            state: the dict `state_dict` returned.
        """
        indices = state.get("indices")
        layout = state.get("layout")
        self.indices = indices.long().clone() if indices is not None and indices.numel() else None
        self.layout = layout.float().clone() if layout is not None and layout.numel() else None
        self._sprite = None

    def _say_once(self, ctx: EpochContext, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            ctx.log(message)

    def __call__(self, ctx: EpochContext) -> None:
        """Log the projector embedding and write the t-SNE figure for `ctx.epoch`."""
        evaluation = ctx.eval
        if evaluation is None or self.limit == 0:
            return
        total = evaluation.targets.numel()
        if self.indices is None or (self.indices.numel() and int(self.indices.max()) >= total):
            self.indices = stratified_indices(evaluation.targets, self.limit, self.seed)
            self.layout, self._sprite = None, None
        indices = self.indices
        if indices.numel() == 0:
            self._say_once(ctx, "empty", "projection: no validation points, nothing to show")
            return
        embeddings = evaluation.embeddings[indices]  # (K, D)
        targets = evaluation.targets[indices]
        predictions = evaluation.predictions[indices]

        log_dir = ctx.log_dir
        if self._sprite is None:  # once per run (and once after --resume)
            images, _ = gather(ctx.val_data, indices)
            thumbnails = sprite_images(display_pixels(images, ctx.normalization))
            self._sprite = (write_sprite(log_dir, thumbnails), thumbnails.shape[-1])
        metadata = projector_metadata(targets, predictions, ctx.class_names)
        write_projector(log_dir, embeddings, metadata, ctx.epoch, *self._sprite)

        count = indices.numel()
        if count < MIN_TSNE_POINTS:
            self._say_once(
                ctx,
                "few",
                f"projection: t-SNE skipped, {count} point(s) is fewer than the "
                f"{MIN_TSNE_POINTS} it needs (the TensorBoard projector still has them)",
            )
            return
        perplexity = effective_perplexity(count, self.perplexity)
        if perplexity < self.perplexity:
            self._say_once(
                ctx,
                "perplexity",
                f"projection: t-SNE perplexity lowered from {self.perplexity:g} to "
                f"{perplexity:.3g}, the most {count} points allow ((points - 1) / 3)",
            )
        previous = self.layout
        if previous is not None and previous.shape != (count, 2):
            previous = None
        ctx.draw_figure(  # the t-SNE too runs in the figure worker
            "tsne",
            draw_tsne,
            embeddings,
            previous,
            targets,
            predictions,
            ctx.class_names,
            epoch=ctx.epoch,
            perplexity=perplexity,
            seed=self.seed,
            dpi=110,
            on_value=self._keep_layout,
        )

    def _keep_layout(self, layout: Tensor) -> None:
        """The layout `draw_tsne` computed: where the next epoch's t-SNE starts."""
        self.layout = layout

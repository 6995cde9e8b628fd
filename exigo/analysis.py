"""The extension API: what an analysis is, and what it receives after every epoch.

An analysis is a subclass of `Analysis`. After each epoch the pipeline evaluates the model once
over the held-out set and calls every analysis with an `EpochContext` holding that evaluation,
the trained model and the fixed probe images. The analysis computes numbers, adds scalars to
`ctx.metrics` (they land in metrics.json, TensorBoard and the report) and draws figures with
`ctx.draw_figure` (they land in `plots/`, TensorBoard and the report, with the title and caption
the analysis declares). A minimal one, complete:

```python
import torch
from matplotlib.figure import Figure

from exigo.analysis import Analysis, EpochContext, FigureInfo


def draw_confidence(per_class, class_names, title):  # the figure worker calls it
    figure = Figure(figsize=(6, 3))
    figure.add_subplot().bar(class_names, per_class.tolist())
    figure.suptitle(title)
    return figure


class MeanConfidence(Analysis):
    name = "mean_confidence"
    figures = (
        FigureInfo("mean_confidence", "Mean confidence", "Mean top probability per class."),
    )

    def __call__(self, ctx: EpochContext) -> None:
        if ctx.eval is None:
            return
        top = ctx.eval.probabilities.max(dim=1).values  # [N]
        classes = range(len(ctx.class_names))
        per_class = torch.stack([top[ctx.eval.targets == c].mean() for c in classes])
        ctx.metrics["mean_confidence/all"] = float(top.mean())
        ctx.draw_figure(
            "mean_confidence", draw_confidence, per_class, ctx.class_names,
            f"Mean confidence {ctx.when}",
        )
```

Register it with one line, `[*default_analyses(config), MeanConfidence()]` as `run`'s
analyses (or add it to `exigo.analyses.default_analyses`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from exigo.data import Normalization, display_pixels, gather

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from exigo.engine.training import EvalResult, TrainResult
    from exigo.figures.pool import Drawn

__all__ = [
    "Analysis",
    "CostShape",
    "EpochContext",
    "FigureInfo",
    "FigureSink",
    "Probe",
    "make_probe",
    "select_probe",
]


@dataclass(frozen=True)
class FigureInfo:
    """A figure an analysis draws every epoch, as the report and TensorBoard present it.

    Attributes:
        name: file stem and TensorBoard tag: `plots/{name}_{epoch}.png` (`_init` before
            training). Unique within the run.
        title: heading of the figure's section in the report.
        caption: one or two sentences: what the figure shows and how to read it.
    """

    name: str
    title: str
    caption: str


@dataclass(frozen=True)
class CostShape:
    """What an analysis' cost depends on (`Analysis.cost`).

    Attributes:
        probe_images: P, the fixed probe images.
        num_classes: K.
        image_shape: `(C, H, W)` of one image.
        training_images: N, the training set's size (0: not known).
    """

    probe_images: int
    num_classes: int
    image_shape: tuple[int, int, int]
    training_images: int = 0


class Analysis:
    """Base class of every per-epoch analysis: each hook is declared here, with its default.

    Subclass it, set `name` and `figures`, implement `__call__`. Settings come in through your
    own `__init__` (the pipeline never hands an analysis the run's configuration); the rest
    through the `EpochContext`.

    The one way to make a figure is `ctx.draw_figure(name, draw, *args)`: `draw` is a plain
    function (module-level, or a closure: it is sent with cloudpickle) returning a matplotlib
    `Figure` (or a `exigo.figures.pool.Drawn`, a figure and a value sent back to `on_value`).
    It runs in the figure worker process while the run goes on; the PNG is written to
    `plots/{name}_{tag}.png` and logged to TensorBoard before the epoch is committed. Every
    `name` must be declared in `figures`, with its title and caption.

    Cost: an analysis that runs the model declares how many passes it makes (`cost`, in
    forward-backward passes of one image, the unit of training). Before the first epoch the
    pipeline compares the sum with the epoch's training passes times `--analysis-budget`;
    when it is over, it lowers `scale` (the analysis lowers its own settings to match) and,
    if that is not enough, sets `every` to run the costly analyses every k epochs, and prints
    one line saying what it chose (`exigo.engine.budget`).

    Rules: leave the model's weights, mode and `requires_grad` flags as you found them; change
    no global state that outlives the call (thread counts, random seeds: use your own
    `torch.Generator`); raise on failure (the pipeline reports it and goes on with the other
    analyses; the epoch's other outputs are written).

    Class attributes (override them in the subclass):
        name: unique name: the analysis' key in failure messages, timings
            (`analysis_seconds/{name}`) and `models/last.pt`.
        figures: the figures it may draw, in the order the report shows them.
        before_training: also call it once with epoch 0 before the first epoch (untrained
            model, `ctx.eval` None).
        worker_imports: modules the figure worker imports as soon as it starts, while the first
            epoch trains (those its draw functions need, when slow to import: `("openTSNE",)`).
        training_dynamics: ask the training pass to record every example's given-label
            probability and margin (`ctx.train.dynamics`); it records them only when an
            analysis asks (a few element-wise operations per batch, 24 bytes per example).

    Attributes set by the pipeline (defaults: full settings, every epoch):
        scale: share of its default cost the analysis may spend, in (0, 1]; `cost` and
            `__call__` follow it.
        every: runs after epochs divisible by `every`, and after the last epoch.
    """

    name: ClassVar[str] = ""
    figures: ClassVar[tuple[FigureInfo, ...]] = ()
    before_training: ClassVar[bool] = False
    worker_imports: ClassVar[tuple[str, ...]] = ()
    training_dynamics: ClassVar[bool] = False
    scale: float = 1.0
    every: int = 1

    def cost(self, shape: CostShape) -> float:
        """Model passes per epoch at the current `scale`, in forward-backward passes of one image.

        A forward pass alone counts 1/3 (its backward costs about twice the forward). An
        epoch's training costs one pass per training image, so the two compare directly.

        Args:
            shape: probe size, classes and image shape of the run.

        Returns:
            The passes; 0 (the default) for an analysis that only reads `ctx.eval`.
        """
        return 0.0

    def due(self, epoch: int, last_epoch: int) -> bool:
        """Whether the analysis runs after `epoch` (`every`, and always after the last).

        Args:
            epoch: the epoch just trained (1-based).
            last_epoch: the run's last epoch.

        Returns:
            True when it runs.
        """
        return epoch % self.every == 0 or epoch == last_epoch

    def __call__(self, ctx: EpochContext) -> None:
        """Analyse one epoch: add scalars to `ctx.metrics`, draw figures with `ctx.draw_figure`.

        Args:
            ctx: the epoch's model, evaluation, probe images and output channels.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(ctx)")

    def state_dict(self) -> dict[str, Any]:
        """State that must survive `--resume` (colour scales, previous layouts).

        Saved in `models/last.pt` after every epoch. Tensors and plain values only.

        Returns:
            The state; `{}` (the default) saves nothing.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned, when the run resumes.

        Args:
            state: a `state_dict()` result saved by an earlier attempt of the same run.
        """


@dataclass(frozen=True)
class Probe:
    """Fixed validation images that gradient-based analyses explain every epoch.

    Attributes:
        images: float tensor [P, C, H, W], as the model takes them (normalised), on the device.
        labels: int64 tensor [P] on the device.
        pixels: float tensor [P, C, H, W] in [0, 1] for display, on the CPU.
        indices: int64 tensor [P], positions in the validation set.
    """

    images: Tensor
    labels: Tensor
    pixels: Tensor
    indices: Tensor


class FigureSink(Protocol):
    """Where `EpochContext.draw_figure` sends a figure: the pipeline's `FigurePool`."""

    def submit(
        self,
        draw: Callable[..., Figure | Drawn],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        path: Path,
        dpi: int,
        name: str,
        step: int,
        on_value: Callable[[Any], None] | None = None,
    ) -> None:
        """Draw `draw(*args, **kwargs)` and write its PNG to `path` (now or in a worker).

        Args:
            draw: returns a matplotlib Figure or a `Drawn`.
            args: its positional arguments.
            kwargs: its keyword arguments.
            path: the PNG to write.
            dpi: resolution.
            name: TensorBoard tag.
            step: TensorBoard step.
            on_value: receives the `Drawn` value in this process.
        """


@dataclass
class EpochContext:
    """Everything an analysis may read after an epoch, and the one way it draws figures.

    Attributes:
        epoch: 1-based epoch just finished; 0 before training (only analyses with
            `before_training = True` are called then, with `eval` None).
        model: the trained model, in eval mode, on `device`.
        eval: this epoch's evaluation pass over the whole validation set; None before training.
        probe: the fixed probe images.
        class_names: display name per class.
        normalization: how images were made from pixels, or None if unknown.
        val_data: the validation dataset, in the order of `eval`'s rows.
        device: where the model lives.
        log_dir: the run's TensorBoard folder (for TensorBoard plugins' own files, such as the
            projector's).
        plots_dir: where figures are written (`draw_figure` chooses the file names).
        save_dir: the run's folder, for an analysis' own files (write them atomically with
            `exigo._io.atomic_write_bytes`, and name them in `exigo.engine.run_dir.RUN_OUTPUTS`
            so that a new run replaces them).
        figures: the pipeline's figure pool.
        metrics: scalars the analyses add (name -> float); they land in metrics.json,
            TensorBoard and the report.
        log: prints one line in the run's console, never broken by the console (a long line
            is the terminal's to wrap, so the paths in it stay whole).
        declared: figure names the analysis being called may draw (set by the pipeline).
        train: this epoch's training pass; when an analysis sets `training_dynamics`, its
            `dynamics` hold every training example's given-label probability and margin from
            that pass (whole on rank 0 under torchrun), by position in `train_data`. None
            before training.
        train_data: the training dataset, as given to `run()` (the positions of
            `train.dynamics`); None where the caller has none.
    """

    epoch: int
    model: nn.Module
    eval: EvalResult | None
    probe: Probe
    class_names: list[str]
    normalization: Normalization | None
    val_data: Dataset
    device: torch.device
    log_dir: Path
    plots_dir: Path
    save_dir: Path
    figures: FigureSink
    metrics: dict[str, float] = field(default_factory=dict)
    log: Callable[[str], None] = print
    declared: frozenset[str] = frozenset()
    train: TrainResult | None = None
    train_data: Dataset | None = None

    @property
    def tag(self) -> str:
        """`init` before training, else the epoch number: the suffix of figure names."""
        return "init" if self.epoch == 0 else str(self.epoch)

    @property
    def when(self) -> str:
        """`before training` or `after epoch N`, for figure titles."""
        return "before training" if self.epoch == 0 else f"after epoch {self.epoch}"

    def draw_figure(
        self,
        name: str,
        draw: Callable[..., Figure | Drawn],
        /,
        *args: Any,
        dpi: int = 100,
        on_value: Callable[[Any], None] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Draw `draw(*args, **kwargs)` into `plots/{name}_{tag}.png` and TensorBoard.

        The call happens in the figure worker process while the run goes on (or here, when
        the run has no worker); the PNG is the same either way. Tensors on a GPU are sent as
        CPU copies. A `draw` that cannot be sent, or fails there, is drawn here, with one line
        in the console saying so.

        Args:
            name: the figure's name, declared in the analysis' `figures`.
            draw: a function returning a matplotlib Figure, or a `Drawn` (a Figure and a value
                for `on_value`).
            *args: its positional arguments (tensors, arrays, plain values).
            dpi: resolution of the PNG.
            on_value: called in this process with the `Drawn` value (None for a plain Figure)
                before the epoch is committed; not called if drawing fails.
            **kwargs: its keyword arguments.

        Returns:
            Path of the PNG (written by the time the epoch is committed).

        Raises:
            ValueError: `name` is not one of the analysis' declared figures.
        """
        if name not in self.declared:
            raise ValueError(
                f"figure {name!r} is not declared: add FigureInfo({name!r}, title, caption) to "
                f"the analysis' `figures` (declared: {', '.join(sorted(self.declared)) or 'none'})"
            )
        path = self.plots_dir / f"{name}_{self.tag}.png"
        self.figures.submit(
            draw, args, kwargs, path=path, dpi=dpi, name=name, step=self.epoch, on_value=on_value
        )
        return path


def select_probe(targets: Tensor, size: int, num_classes: int) -> Tensor:
    """Indices of `size` probe images: one per class in class order, round-robin when more.

    Takes the first occurrence(s) of each class in dataset order, so the probe is the same for
    every run on the same data. Classes absent from `targets` are skipped.

    Args:
        targets: int64 [N], labels of the validation set.
        size: number of images wanted (fewer are returned if the set is smaller).
        num_classes: C.

    Returns:
        int64 tensor [min(size, N)].
    """
    per_class = [torch.nonzero(targets == c).flatten() for c in range(num_classes)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < min(size, targets.numel()):
        added = False
        for members in per_class:
            if depth < members.numel() and len(chosen) < size:
                chosen.append(int(members[depth]))
                added = True
        if not added:
            break
        depth += 1
    return torch.tensor(chosen, dtype=torch.long)


def make_probe(
    val_data: Dataset,
    targets: Tensor,
    size: int,
    num_classes: int,
    normalization: Normalization | None,
    device: torch.device,
) -> Probe:
    """The run's probe: `select_probe`'s images, on `device`, with their display pixels.

    Args:
        val_data: the validation set.
        targets: int64 [N], its labels.
        size: probe images wanted.
        num_classes: C.
        normalization: how images were made from pixels, or None.
        device: where the model lives.

    Returns:
        The `Probe`.
    """
    indices = select_probe(targets, size, num_classes)
    images, labels = gather(val_data, indices)
    pixels = display_pixels(images, normalization)
    return Probe(images.to(device), labels.to(device), pixels, indices)

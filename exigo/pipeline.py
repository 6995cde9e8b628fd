"""The epoch loop: train, evaluate once, hand the evaluation to every analysis, record the run.

```
run(config, model, train_data, val_data, analyses)
  per epoch:  train_epoch -> TrainResult      evaluate -> EvalResult (one pass over val_data)
              analysis(EpochContext) for each analysis (a failing analysis is logged, skipped)
              metrics.json <- one row   TensorBoard <- scalars   models/best.pt if eval loss fell
```

Outputs in `config.save_dir`: `plots/`, `models/best.pt` (and `models/last.pt`),
`metrics.json`, `run.json`, and TensorBoard events in `logs/<run-name>/`. A new run replaces
the previous run's plots, models and metrics there; TensorBoard runs accumulate side by side.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from exigo._io import atomic_write_bytes, atomic_write_json
from exigo.checkpoint import save_checkpoint
from exigo.config import Config
from exigo.data import Normalization, dataset_targets, gather
from exigo.training import EvalResult, TrainResult, evaluate, train_epoch

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.console import Console
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "Analysis",
    "EpochContext",
    "Probe",
    "RunResult",
    "SaveDirError",
    "load_metrics",
    "prepare_save_dir",
    "resolve_device",
    "run",
    "select_probe",
]

#: Files and folders of one run inside the save directory, replaced by the next run.
RUN_OUTPUTS = ("plots", "models", "metrics.json", "run.json", "report.html")


class SaveDirError(Exception):
    """The save directory cannot be created or written."""


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


@dataclass
class EpochContext:
    """Everything an analysis may read after an epoch, and the one way it writes figures.

    Attributes:
        epoch: 1-based epoch just finished; 0 before training (only analyses with
            `before_training = True` are called then, with `eval` None).
        model: the trained model, in eval mode, on `device`. Analyses must leave its weights,
            mode and `requires_grad` flags as they found them.
        eval: this epoch's evaluation pass over the whole validation set.
        probe: the fixed probe images.
        class_names: display name per class.
        normalization: how images were made from pixels, or None if unknown.
        val_data: the validation dataset, in the order of `eval`'s rows.
        device: where the model lives.
        config: the run's configuration.
        plots_dir: folder of this run's figures.
        writer: TensorBoard writer of this run.
        history: metric rows of the epochs before this one.
        metrics: scalars the analysis adds (name -> float); they land in metrics.json and
            TensorBoard.
        figures: paths of the figures written for this epoch so far.
        log: prints a line in the run's console.
    """

    epoch: int
    model: nn.Module
    eval: EvalResult | None
    probe: Probe
    class_names: list[str]
    normalization: Normalization | None
    val_data: Dataset
    device: torch.device
    config: Config
    plots_dir: Path
    writer: SummaryWriter
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    log: Callable[[str], None] = print

    @property
    def tag(self) -> str:
        """`init` before training, else the epoch number: the suffix of figure names."""
        return "init" if self.epoch == 0 else str(self.epoch)

    def save_figure(self, figure: Figure, name: str, dpi: int = 100) -> Path:
        """Render `figure` once, write `plots/{name}_{tag}.png` and log it to TensorBoard.

        Args:
            figure: a matplotlib Figure (preferably `matplotlib.figure.Figure()`, which needs
                no pyplot state and is freed when dropped).
            name: file stem and TensorBoard tag, e.g. `confusion_matrix`.
            dpi: resolution of the PNG.

        Returns:
            Path of the PNG.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from PIL import Image

        figure.set_dpi(dpi)
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        rgb = np.asarray(canvas.buffer_rgba())[..., :3]  # (H, W, 3) uint8
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="png", optimize=False)
        path = atomic_write_bytes(self.plots_dir / f"{name}_{self.tag}.png", buffer.getvalue())
        self.writer.add_image(name, rgb, global_step=self.epoch, dataformats="HWC")
        figure.clear()
        self.figures.append(path)
        return path


@runtime_checkable
class Analysis(Protocol):
    """A per-epoch analysis: a callable with a name.

    Optional attributes: `before_training = True` to be called once with epoch 0 before the
    first epoch (the model untrained, `ctx.eval` None).
    """

    name: str

    def __call__(self, ctx: EpochContext) -> None:
        """Compute from `ctx`, add scalars to `ctx.metrics`, write figures via `ctx.save_figure`."""


@dataclass
class RunResult:
    """What a run produced.

    Attributes:
        history: one metrics row per completed epoch (as in metrics.json).
        best_epoch: epoch of the lowest evaluation loss.
        best_eval_loss: that loss.
        failed_analyses: `(epoch, analysis name, error message)` for every analysis that raised.
        save_dir: where the outputs are.
        log_dir: the TensorBoard run folder.
    """

    history: list[dict[str, Any]]
    best_epoch: int
    best_eval_loss: float
    failed_analyses: list[tuple[int, str, str]]
    save_dir: Path
    log_dir: Path


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; any other name is passed to `torch.device`."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def prepare_save_dir(save_dir: str | Path) -> Path:
    """Create `save_dir` if needed and prove it writable, before any training.

    Raises:
        SaveDirError: it cannot be created, is not a folder, or cannot be written.
    """
    save_dir = Path(save_dir)
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        probe = save_dir / f".exigo-write-test-{time.monotonic_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise SaveDirError(
            f"cannot write to --save-dir {save_dir}: {error.strerror or error}"
        ) from None
    return save_dir


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


def _clear_previous_run(save_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        path = save_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("torchvision", "matplotlib", "tensorboard", "numpy"):
        imported = sys.modules.get(module)
        if imported is not None:
            versions[module] = getattr(imported, "__version__", "?")
    return versions


def _make_probe(
    val_data: Dataset,
    targets: Tensor,
    size: int,
    num_classes: int,
    normalization: Normalization | None,
    device: torch.device,
) -> Probe:
    indices = select_probe(targets, size, num_classes)
    images, labels = gather(val_data, indices)
    if normalization is not None:
        pixels = normalization.denormalize(images).clamp(0, 1)
    else:  # unknown normalisation: stretch each image to [0, 1] for display
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        high = images.amax(dim=(1, 2, 3), keepdim=True)
        pixels = (images - low) / (high - low).clamp_min(1e-12)
    return Probe(images.to(device), labels.to(device), pixels, indices)


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run(
    config: Config,
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset,
    analyses: Sequence[Analysis] = (),
    *,
    class_names: Sequence[str] | None = None,
    normalization: Normalization | None = None,
    console: Console | None = None,
) -> RunResult:
    """Train `model` for `config.epochs` epochs and analyse it after each one.

    Works for any classifier mapping [N, C, H, W] images to [N, K] logits whose last
    `nn.Linear` (or `classifier` attribute) receives the embedding.

    Args:
        config: the run's settings (epochs, batch size, learning rate, seed, folders, device).
        model: the classifier to train, on any device (it is moved to the run's device).
        train_data: dataset of `(image [C, H, W], label)` pairs.
        val_data: held-out dataset, evaluated once per epoch.
        analyses: per-epoch analyses, called in order after each evaluation.
        class_names: display name per class; default `val_data.classes` or "0".."K-1".
        normalization: how images were made from pixels (for display and blank baselines);
            default `val_data.normalization` when present.
        console: a rich Console for progress and messages (default: stdout).

    Returns:
        The `RunResult`.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
    from torch.utils.tensorboard import SummaryWriter

    console = console or Console()
    save_dir = prepare_save_dir(config.save_dir)
    device = resolve_device(config.device)
    model = model.to(device)
    targets = dataset_targets(val_data)
    class_names = list(
        class_names or getattr(val_data, "classes", None) or range(int(targets.max()) + 1)
    )
    class_names = [str(name) for name in class_names]
    normalization = normalization or getattr(val_data, "normalization", None)

    _clear_previous_run(save_dir)
    plots_dir = save_dir / "plots"
    models_dir = save_dir / "models"
    plots_dir.mkdir(parents=True, exist_ok=True)
    models_dir.mkdir(parents=True, exist_ok=True)
    run_name = config.run_name or _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    log_dir = save_dir / "logs" / run_name
    writer = SummaryWriter(log_dir=str(log_dir))
    atomic_write_json(
        save_dir / "run.json",
        {
            "run_name": run_name,
            "config": config.to_dict(),
            "seed": config.seed,
            "device": str(device),
            "versions": _versions(),
            "model": type(model).__name__,
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
            "train_size": len(train_data),
            "val_size": len(val_data),
            "class_names": class_names,
        },
    )

    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = -(-len(train_data) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    probe = _make_probe(
        val_data, targets, config.probe_size, len(class_names), normalization, device
    )
    history: list[dict[str, Any]] = []
    failures: list[tuple[int, str, str]] = []
    best_epoch, best_loss = 0, float("inf")

    def context(epoch: int, evaluation: EvalResult | None) -> EpochContext:
        return EpochContext(
            epoch=epoch,
            model=model,
            eval=evaluation,
            probe=probe,
            class_names=class_names,
            normalization=normalization,
            val_data=val_data,
            device=device,
            config=config,
            plots_dir=plots_dir,
            writer=writer,
            history=list(history),
            log=console.print,
        )

    def call_analyses(ctx: EpochContext, which: Sequence[Analysis]) -> dict[str, float]:
        seconds: dict[str, float] = {}
        model.eval()
        for analysis in which:
            name = getattr(analysis, "name", type(analysis).__name__)
            start = time.perf_counter()
            try:
                analysis(ctx)
            except Exception as error:  # an analysis never kills training
                failures.append((ctx.epoch, name, f"{type(error).__name__}: {error}"))
                console.print(
                    f"[red]analysis {name} failed at epoch {ctx.epoch}:[/red] "
                    f"{type(error).__name__}: {error}"
                )
            seconds[name] = time.perf_counter() - start
        return seconds

    try:
        early = [a for a in analyses if getattr(a, "before_training", False)]
        if early:
            call_analyses(context(0, None), early)

        columns = (
            TextColumn("{task.description:<24}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
        )
        for epoch in range(1, config.epochs + 1):
            epoch_start = time.perf_counter()
            order = torch.randperm(len(train_data), generator=generator)
            with Progress(*columns, console=console, transient=False) as progress:
                task = progress.add_task(
                    f"epoch {epoch}/{config.epochs} training", total=len(train_data)
                )
                trained: TrainResult = train_epoch(
                    model,
                    train_data,
                    order,
                    optimizer,
                    scheduler,
                    batch_size=config.batch_size,
                    device=device,
                    label_smoothing=config.label_smoothing,
                    on_batch=lambda n, task=task: progress.advance(task, n),
                )
                task = progress.add_task(
                    f"epoch {epoch}/{config.epochs} evaluating", total=len(val_data)
                )
                evaluation = evaluate(
                    model,
                    val_data,
                    batch_size=config.eval_batch_size,
                    device=device,
                    on_batch=lambda n, task=task: progress.advance(task, n),
                )
            ctx = context(epoch, evaluation)
            analysis_seconds = call_analyses(ctx, analyses)
            improved = evaluation.loss < best_loss
            if improved:
                best_epoch, best_loss = epoch, evaluation.loss
                save_checkpoint(
                    models_dir / "best.pt",
                    model,
                    epoch=epoch,
                    eval_loss=evaluation.loss,
                    eval_accuracy=evaluation.accuracy,
                )
            row: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": trained.loss,
                "train_accuracy": trained.accuracy,
                "eval_loss": evaluation.loss,
                "eval_accuracy": evaluation.accuracy,
                "lr": optimizer.param_groups[0]["lr"],
                "train_seconds": trained.seconds,
                "eval_seconds": evaluation.seconds,
                "analysis_seconds": analysis_seconds,
                "best": improved,
                **ctx.metrics,
            }
            row["seconds"] = time.perf_counter() - epoch_start
            history.append(row)
            _log_scalars(writer, row, epoch)
            atomic_write_json(save_dir / "metrics.json", history)
            console.print(
                f"epoch {epoch}/{config.epochs}  train loss {trained.loss:.4f}  "
                f"eval loss {evaluation.loss:.4f}  eval accuracy {evaluation.accuracy:.2%}  "
                f"({row['seconds']:.1f} s{', best so far' if improved else ''})",
                highlight=False,
                soft_wrap=True,
            )
            try:  # report.html from the files just written; like an analysis, never kills training
                from exigo.report import write_report

                write_report(save_dir)
            except Exception as error:
                failures.append((epoch, "report", f"{type(error).__name__}: {error}"))
                console.print(
                    f"[red]report failed at epoch {epoch}:[/red] {type(error).__name__}: {error}"
                )
    finally:
        writer.flush()
        writer.close()

    return RunResult(
        history=history,
        best_epoch=best_epoch,
        best_eval_loss=best_loss,
        failed_analyses=failures,
        save_dir=save_dir,
        log_dir=log_dir,
    )


def _log_scalars(writer: SummaryWriter, row: dict[str, Any], epoch: int) -> None:
    names = {
        "train_loss": "loss/train",
        "eval_loss": "loss/eval",
        "train_accuracy": "accuracy/train",
        "eval_accuracy": "accuracy/eval",
        "lr": "learning_rate",
    }
    skip = {"epoch", "best", "seconds", "train_seconds", "eval_seconds"}
    for key, value in row.items():
        if key in skip or not _numeric(value):
            continue
        writer.add_scalar(names.get(key, key), value, global_step=epoch)
    for name, seconds in row["analysis_seconds"].items():
        writer.add_scalar(f"seconds/{name}", seconds, global_step=epoch)
    writer.add_scalar("seconds/train", row["train_seconds"], global_step=epoch)
    writer.add_scalar("seconds/eval", row["eval_seconds"], global_step=epoch)


def load_metrics(save_dir: str | Path) -> list[dict[str, Any]]:
    """The metrics rows of the run in `save_dir` (its metrics.json)."""
    return json.loads((Path(save_dir) / "metrics.json").read_text())

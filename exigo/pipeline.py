"""The epoch loop: train, evaluate once, hand the evaluation to every analysis, record the run.

```
run(config, model, train_data, val_data, analyses)
  start:      lock save_dir; resume from models/last.pt, or replace the previous run's outputs
  per epoch:  train_epoch -> TrainResult      evaluate -> EvalResult (one pass over val_data)
              analysis(EpochContext) for each analysis (a failing analysis is logged, skipped)
              commit: models/best.pt if eval loss fell, metrics.json row, TensorBoard scalars,
                      models/last.pt (all that --resume needs)
```

Outputs in `config.save_dir`: `plots/`, `models/best.pt` and `models/last.pt`,
`metrics.json`, `run.json`, and TensorBoard events in `logs/<run-name>/`. A new run replaces
the previous run's plots, models and metrics there; TensorBoard runs accumulate side by side.

What a run survives:

- Another run on the same `save_dir`: it holds `save_dir/.lock` (`FolderLock`) and the second
  run stops with `SaveDirError` before touching anything.
- SIGINT (Ctrl-C) or SIGTERM: the run stops at the next batch or between two analyses,
  drops the unfinished epoch, closes TensorBoard and raises `RunInterrupted`; a second signal
  stops it at once. Every file is written atomically, so even `kill -9` leaves complete files.
- A NaN or infinite loss: `RunDiverged` before any analysis sees the diverged model.
- A failing analysis: logged with its traceback, skipped for that epoch, reported in
  `RunResult.failed_analyses`.

`--resume` (`Config.resume`) restores the model, optimizer, scheduler, every random number
generator, the best loss, the metrics history and each analysis' `state_dict()` from
`models/last.pt`, so on the CPU the resumed run's metrics equal an uninterrupted run's.

Under `torchrun` (`exigo.engine.world`) every process trains its shard of each epoch through
DistributedDataParallel and evaluates its shard of the validation set; rank 0 receives the
whole evaluation, runs the analyses and writes every output, the other processes print and
write nothing. The processes agree on a stop (signal) or a divergence, so they stop together.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import json
import math
import platform
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from exigo._io import FolderLock, FolderLockedError, atomic_write_bytes, atomic_write_json
from exigo.figures.pool import Drawn, FigureRenderer, available_cpus, log_png, render_png
from exigo.engine.checkpoint import (
    apply_weights,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from exigo.config import Config
from exigo.data import Normalization, dataset_targets, display_pixels, gather
from exigo.engine.world import (
    DistributedError,
    World,
    all_or_none,
    broadcast_buffers,
    evaluate_sharded,
    process_group,
    reduce_train_result,
    training_indices,
    wrap,
)
from exigo.models import embedding_module
from exigo.engine.training import DivergenceError, EvalResult, TrainResult, evaluate, train_epoch

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.console import Console
    from rich.progress import Progress
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "Analysis",
    "EpochContext",
    "Probe",
    "ResumeError",
    "RunDiverged",
    "RunInterrupted",
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
BEST_CHECKPOINT = "models/best.pt"
LAST_CHECKPOINT = "models/last.pt"

#: Settings that may differ between a run and its `--resume`: they say where files are or how
#: fast it runs, not what is trained. Every other field must match.
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "save_dir",
        "data_dir",
        "download",
        "device",
        "eval_batch_size",
        "threads",
        "run_name",
        "dist_timeout",
    }
)

#: Under torchrun the processes agree whether a signal stops them every this many training
#: batches: often enough to stop within seconds, rarely enough to cost no measurable time.
STOP_CHECK_BATCHES = 10


class SaveDirError(Exception):
    """The save directory cannot be created, written or locked, or holds others' files."""


class ResumeError(Exception):
    """`--resume` finds nothing to continue, or settings that differ from the run's."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; the outputs of every completed epoch are intact.

    A `KeyboardInterrupt`, so code that catches `Exception` (such as the pipeline's guard
    around each analysis) lets it through.

    Args:
        signal_number: the signal received (`signal.SIGINT` or `signal.SIGTERM`).
        message: the exception's text; None: "interrupted by SIGINT" (or SIGTERM).

    Attributes:
        signal_number: the signal received (`signal.SIGINT` or `signal.SIGTERM`).
        result: the completed epochs (set by the pipeline before the exception leaves `run`).
    """

    def __init__(self, signal_number: int, message: str | None = None) -> None:
        self.signal_number = signal_number
        self.result: RunResult | None = None
        super().__init__(message or f"interrupted by {self.signal_name}")

    @property
    def signal_name(self) -> str:
        """`SIGINT`, `SIGTERM`, ..."""
        return signal.Signals(self.signal_number).name

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports it: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signal_number


class RunDiverged(DivergenceError):
    """The loss became NaN or infinite; the epoch was dropped, earlier outputs are intact.

    Args:
        message: what diverged, and when.
        result: the completed epochs.

    Attributes:
        result: the completed epochs.
    """

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


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
        renderer: renders figures in a helper process (the pipeline's); None: at once, here.
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
    renderer: FigureRenderer | None = None

    @property
    def tag(self) -> str:
        """`init` before training, else the epoch number: the suffix of figure names."""
        return "init" if self.epoch == 0 else str(self.epoch)

    def save_figure(self, figure: Figure, name: str, dpi: int = 100) -> Path:
        """Render `figure` once, write `plots/{name}_{tag}.png` and log it to TensorBoard.

        With a `renderer` (in a pipeline run on two or more CPUs) the rendering happens in a
        helper process while the analyses go on; the pipeline waits for it, and logs the
        image to TensorBoard, before it commits the epoch. Leave `figure` alone afterwards.

        Args:
            figure: a matplotlib Figure (preferably `matplotlib.figure.Figure()`, which needs
                no pyplot state and is freed when dropped).
            name: file stem and TensorBoard tag, e.g. `confusion_matrix`.
            dpi: resolution of the PNG.

        Returns:
            Path of the PNG (written by the time the epoch is committed).
        """
        path = self.plots_dir / f"{name}_{self.tag}.png"
        if self.renderer is not None:
            self.renderer.submit(figure, path, dpi, name, self.epoch)
        else:
            png = render_png(figure, dpi)
            atomic_write_bytes(path, png)
            log_png(self.writer, name, png, self.epoch)
        self.figures.append(path)
        return path

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
        """`save_figure(draw(*args, **kwargs), name, dpi)`, with `draw` called in the helper.

        With a `renderer`, the figure is built there too, not only rendered: this process
        only pickles `draw` (a module-level function) and its arguments (tensors, plain
        values), which costs less than building the figure and pickling it. A `draw` that
        returns a `Drawn` also computes a value there (the t-SNE layout) and gets it back
        through `on_value` before the epoch is committed.

        Args:
            name: file stem and TensorBoard tag, e.g. `saliency`.
            draw: a module-level function returning a matplotlib Figure or a `Drawn`.
            *args: its positional arguments.
            dpi: resolution of the PNG.
            on_value: called in this process with the `Drawn` value (None for a Figure) once
                the figure is written; not called if drawing fails.
            **kwargs: its keyword arguments.

        Returns:
            Path of the PNG (written by the time the epoch is committed).
        """
        if self.renderer is None:
            drawn = Drawn.of(draw(*args, **kwargs))
            path = self.save_figure(drawn.figure, name, dpi)
            if on_value is not None:
                on_value(drawn.value)
            return path
        path = self.plots_dir / f"{name}_{self.tag}.png"
        self.renderer.submit_draw(draw, args, kwargs, path, dpi, name, self.epoch, on_value)
        self.figures.append(path)
        return path


@runtime_checkable
class Analysis(Protocol):
    """A per-epoch analysis: a callable with a name.

    Optional attributes: `before_training = True` to be called once with epoch 0 before the
    first epoch (the model untrained, `ctx.eval` None); `helper_imports`, modules the figure
    helper process should import while the first epoch trains (those its `draw_figure`
    functions need, when slow to import).
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
    """`auto` picks cuda, then mps, then cpu; any other name is passed to `torch.device`.

    Args:
        name: `auto`, or a torch device string such as `cpu`, `cuda:1`, `mps`.

    Returns:
        The device, checked to exist on this machine.

    Raises:
        ValueError: an unknown device name, or a device this machine does not have.
    """
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(
                f"--device {name!r} is not a device (auto, cpu, cuda, cuda:1, mps)"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        mps = getattr(torch.backends, "mps", None)
        if device.type == "mps" and not (mps is not None and mps.is_available()):
            raise ValueError(f"--device {name}: MPS is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def prepare_save_dir(save_dir: str | Path) -> Path:
    """Create `save_dir` if needed and prove it writable, before any training.

    Args:
        save_dir: the folder the run writes into.

    Returns:
        `save_dir` as a `Path`.

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


def _check_run_name(run_name: str | None) -> None:
    """A run name becomes a folder under `save_dir/logs`: one plain path component."""
    if run_name is None:
        return
    if run_name in ("", ".", "..") or "/" in run_name or "\\" in run_name or "\0" in run_name:
        raise ValueError(f"run name must be a plain folder name, got {run_name!r}")


def _is_exigo_run(save_dir: Path) -> bool:
    """Whether `save_dir/run.json` was written by exigo (so its neighbours are ours to replace)."""
    try:
        info = json.loads((save_dir / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "run_name" in info and "config" in info


def _check_replaceable(save_dir: Path) -> None:
    """Refuse to delete a folder's `plots/`, `models/`, ... unless an exigo run wrote them.

    Guards against a typo such as `--save-dir ~`, which would otherwise remove `~/models`.
    """
    present = [
        name
        for name in RUN_OUTPUTS
        if (save_dir / name).is_file()
        or ((save_dir / name).is_dir() and any((save_dir / name).iterdir()))
    ]
    if present and not _is_exigo_run(save_dir):
        raise SaveDirError(
            f"--save-dir {save_dir} already holds {', '.join(present)} but no exigo run.json: "
            "a new run would delete them. Choose an empty folder or one an exigo run wrote."
        )


def _clear_previous_run(save_dir: Path, run_name: str) -> None:
    log_dir = save_dir / "logs" / run_name  # the same run name: replace, don't mix event files
    for path in [*(save_dir / name for name in RUN_OUTPUTS), log_dir]:
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
    pixels = display_pixels(images, normalization)
    return Probe(images.to(device), labels.to(device), pixels, indices)


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _analysis_name(analysis: Analysis) -> str:
    return getattr(analysis, "name", type(analysis).__name__)


class _StopSignals:
    """SIGINT and SIGTERM ask the run to stop at the next safe point; a second one stops it now.

    Safe points (`check()`) are batch boundaries and the gaps between analyses, so a stop never
    lands in the middle of writing a checkpoint or metrics.json. Handlers can only be installed
    from the main thread; elsewhere, and for signals the process ignores, the signals keep
    their usual behaviour.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                # an ignored signal stays ignored (a shell script's background job ignores
                # SIGINT, so Ctrl-C in the terminal is not meant for it)
                if signal.getsignal(number) is not signal.SIG_IGN:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, number: int, _frame: object) -> None:
        if self.received is not None:  # asked twice: the user does not want to wait
            raise RunInterrupted(number)
        self.received = number

    def check(self) -> None:
        """Raise `RunInterrupted` if a stop was requested."""
        if self.received is not None:
            raise RunInterrupted(self.received)


@dataclass
class _RunState:
    """What changes from epoch to epoch; `models/last.pt` saves it for `--resume`.

    Attributes:
        run_name: the TensorBoard run folder under `save_dir/logs`.
        epoch: last completed epoch (0 before the first one completes).
        best_epoch: epoch of the lowest evaluation loss so far (0: none yet).
        best_eval_loss: that loss.
        history: one metrics row per completed epoch.
    """

    run_name: str
    epoch: int = 0
    best_epoch: int = 0
    best_eval_loss: float = float("inf")
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_checkpoint(self) -> dict[str, Any]:
        """The fields as checkpoint entries."""
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any]) -> _RunState:
        """The state a `to_checkpoint()` dict (inside a loaded checkpoint) describes."""
        return cls(**{name: payload[name] for name in cls.__dataclass_fields__})


@dataclass
class _Run:
    """A run in progress: what stays fixed from epoch to epoch, and its `_RunState`."""

    config: Config
    model: nn.Module
    train_data: Dataset
    val_data: Dataset
    analyses: Sequence[Analysis]
    class_names: list[str]
    normalization: Normalization | None
    device: torch.device
    probe: Probe
    console: Console
    stop: _StopSignals
    save_dir: Path
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # the shuffling order of every epoch
    state: _RunState
    writer: SummaryWriter | None = None
    renderer: FigureRenderer | None = None  # draws figures on another core while we go on
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    current_epoch: int = 0  # the epoch being trained (for messages)
    world: World | None = None  # the torchrun processes; None in a single-process run
    trainer: nn.Module | None = None  # `model` in DistributedDataParallel (torchrun runs)
    resumed: dict[str, Any] | None = None  # rank 0's models/last.pt, until the others have it

    @property
    def is_main(self) -> bool:
        """Whether this process writes: always, unless it is torchrun's rank 1, 2, ..."""
        return self.world is None or self.world.is_main

    @property
    def log_dir(self) -> Path:
        """The TensorBoard run folder."""
        return self.save_dir / "logs" / self.state.run_name

    @property
    def plots_dir(self) -> Path:
        """Where figures go."""
        return self.save_dir / "plots"

    def result(self) -> RunResult:
        """The `RunResult` of the epochs completed so far."""
        return RunResult(
            history=self.state.history,
            best_epoch=self.state.best_epoch,
            best_eval_loss=self.state.best_eval_loss,
            failed_analyses=self.failures,
            save_dir=self.save_dir,
            log_dir=self.log_dir,
        )

    # ---------------------------------------------------------------- the epoch loop

    def train(self) -> RunResult:
        """Run the remaining epochs; turn a stop or a divergence into an exception with a result.

        Raises:
            RunInterrupted: SIGINT or SIGTERM; the epoch in progress was dropped.
            RunDiverged: a NaN or infinite loss; the epoch in progress was dropped.
        """
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events an interrupted attempt logged after its last completed epoch
        purge_step = self.state.epoch + 1 if self.state.epoch else None
        if self.is_main:
            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
            if self.renderer is None:
                self.renderer = _figure_renderer(self.analyses)
        try:
            if self.state.epoch == 0:
                early = [a for a in self.analyses if getattr(a, "before_training", False)]
                if self.is_main:
                    self._analyse_on_main(self._context(0, None), early)
                self._stop_together()
            for epoch in range(self.state.epoch + 1, self.config.epochs + 1):
                self._run_epoch(epoch)
        except RunInterrupted as interrupt:
            interrupt.args = (self._where_things_are(f"interrupted by {interrupt.signal_name}"),)
            interrupt.result = self.result()
            raise
        except DivergenceError as error:
            message = f"{error}; --lr is {self.config.lr:g}"
            raise RunDiverged(self._where_things_are(message), self.result()) from None
        finally:
            if self.renderer is not None:
                self.renderer.close()
            if self.writer is not None:
                self.writer.close()
        return self.result()

    def _run_epoch(self, epoch: int) -> None:
        started = time.perf_counter()
        self.current_epoch = epoch
        trained, evaluation = self._fit(epoch)
        if not self.is_main:  # rank 0 analyses and writes while this process waits
            self._stop_together()
            self.state.epoch = epoch
            return
        ctx = self._context(epoch, evaluation)
        analysis_seconds = self._analyse_on_main(ctx, self.analyses)
        self._stop_together()
        self._commit(ctx, trained, evaluation, analysis_seconds, started)

    def _stop_together(self) -> None:
        """Under torchrun, every process stops here if any one received a signal.

        A no-op in a single-process run, which checks its own signals at every batch.
        """
        if self.world is None:
            return
        signal_number = self.world.agree_on_signal(self.stop.received)
        if signal_number is not None:
            raise RunInterrupted(signal_number)

    def _analyse_on_main(self, ctx: EpochContext, which: Sequence[Analysis]) -> dict[str, float]:
        """`_analyse`; a stop first tells the processes waiting in `_stop_together`."""
        try:
            return self._analyse(ctx, which)
        except RunInterrupted as interrupt:
            if self.world is not None:
                with suppress(DistributedError):  # the others may have left already
                    self.world.agree_on_signal(interrupt.signal_number)
            raise

    def _fit(self, epoch: int) -> tuple[TrainResult, EvalResult]:
        """Train one epoch and evaluate; a NaN or infinite loss raises before any analysis."""
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        if self.world is None:
            order = torch.randperm(len(self.train_data), generator=self.generator)
        else:  # this process' shard, re-shuffled every epoch (DistributedSampler.set_epoch)
            order = training_indices(
                self.train_data, epoch, self.config.seed, self.world.rank, self.world.world_size
            )
        columns = (
            TextColumn("{task.description:<24}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
        )
        label = f"epoch {epoch}/{self.config.epochs}"
        bars = Progress(*columns, console=self.console, transient=False, disable=not self.is_main)
        with bars as progress:
            trained = self._train_epoch(
                order, self._ticker(progress, f"{label} training", len(order))
            )
            evaluation = self._evaluate(progress, f"{label} evaluating")
        if not math.isfinite(evaluation.loss):
            raise DivergenceError(
                f"evaluation loss became {evaluation.loss}; the learning rate is probably too "
                "high (try a smaller --lr)"
            )
        return trained, evaluation

    def _train_epoch(self, order: Tensor, on_batch: Callable[[int], None]) -> TrainResult:
        """One epoch over `order`; under torchrun through DDP, the result summed over processes."""

        def one_pass(model: nn.Module) -> TrainResult:
            return train_epoch(
                model,
                self.train_data,
                order,
                self.optimizer,
                self.scheduler,
                batch_size=self.config.batch_size,
                device=self.device,
                label_smoothing=self.config.label_smoothing,
                on_batch=on_batch,
            )

        if self.world is None:
            return one_pass(self.model)
        assert self.trainer is not None
        diverged: str | None = None
        try:
            with self.world.collective("training (DistributedDataParallel)"):
                trained = one_pass(self.trainer)
        except DivergenceError as error:  # found on this shard: the others must hear of it
            diverged = str(error)
            trained = TrainResult(loss=math.nan, accuracy=math.nan, seconds=0.0, images=len(order))
        trained = reduce_train_result(trained, self.world)  # NaN anywhere: NaN everywhere
        if not math.isfinite(trained.loss):
            raise DivergenceError(
                diverged
                or f"training loss became {trained.loss} in another process; the learning "
                "rate is probably too high (try a smaller --lr)"
            )
        broadcast_buffers(self.model, self.world)  # evaluate the BatchNorm statistics rank 0 saves
        return trained

    def _evaluate(self, progress: Progress, description: str) -> EvalResult:
        """The evaluation pass; under torchrun each process its shard, gathered to rank 0."""
        if self.world is None:
            return evaluate(
                self.model,
                self.val_data,
                batch_size=self.config.eval_batch_size,
                device=self.device,
                on_batch=self._ticker(progress, description, len(self.val_data)),
            )
        shard = range(self.world.rank, len(self.val_data), self.world.world_size)
        return evaluate_sharded(
            self.model,  # not the DDP wrapper: shards differ in batch count
            self.val_data,
            self.world,
            batch_size=self.config.eval_batch_size,
            device=self.device,
            on_batch=self._ticker(progress, description, len(shard), check_stop=False),
        )

    def _ticker(
        self, progress: Progress, description: str, total: int, *, check_stop: bool = True
    ) -> Callable[[int], None]:
        """A batch callback: advance the bar, then stop here if a signal asked to.

        Under torchrun the processes decide together every `STOP_CHECK_BATCHES` training
        batches (their shards have equal batch counts). Evaluation shards may differ by one
        batch, so evaluation (`check_stop=False`) leaves the decision to the end of the epoch.
        """
        task = progress.add_task(description, total=total)
        batches = 0

        def advance(images: int) -> None:
            nonlocal batches
            progress.advance(task, images)
            if self.world is None:
                self.stop.check()
                return
            batches += 1
            if check_stop and batches % STOP_CHECK_BATCHES == 0:
                self._stop_together()

        return advance

    def _context(self, epoch: int, evaluation: EvalResult | None) -> EpochContext:
        assert self.writer is not None
        return EpochContext(
            epoch=epoch,
            model=self.model,
            eval=evaluation,
            probe=self.probe,
            class_names=self.class_names,
            normalization=self.normalization,
            val_data=self.val_data,
            device=self.device,
            config=self.config,
            plots_dir=self.plots_dir,
            writer=self.writer,
            history=list(self.state.history),
            log=self.console.print,
            renderer=self.renderer,
        )

    def _analyse(self, ctx: EpochContext, which: Sequence[Analysis]) -> dict[str, float]:
        """Call each analysis; one that raises is reported and skipped (training goes on)."""
        seconds: dict[str, float] = {}
        self.model.eval()
        for analysis in which:
            self.stop.check()
            name = _analysis_name(analysis)
            known = set(ctx.metrics)
            start = time.perf_counter()
            try:
                analysis(ctx)
            except Exception as error:  # an analysis never kills training
                self._report_failure(ctx.epoch, name, error)
            seconds[name] = time.perf_counter() - start
            self._check_metrics(ctx, known, name)
        # matplotlib figures are reference cycles: free them now, not when the collector
        # happens to run, so memory stays flat from epoch to epoch
        gc.collect()
        return seconds

    def _report_failure(self, epoch: int, name: str, error: BaseException) -> None:
        first_time = all(failed != name for _, failed, _ in self.failures)
        self.failures.append((epoch, name, f"{type(error).__name__}: {error}"))
        self.console.print(
            f"[red]analysis {name} failed at epoch {epoch}:[/red] {type(error).__name__}: {error}",
            highlight=False,
            soft_wrap=True,
        )
        if first_time:  # the traceback once per analysis: enough to find the bug
            trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            self.console.print(trace, markup=False, highlight=False, soft_wrap=True)

    def _check_metrics(self, ctx: EpochContext, known: set[str], name: str) -> None:
        """Keep an analysis' new metrics only if they are finite numbers (metrics.json is JSON)."""
        for key in [key for key in ctx.metrics if key not in known]:
            value = ctx.metrics[key]
            try:
                number = float(value)
            except (TypeError, ValueError):
                del ctx.metrics[key]
                self._report_failure(
                    ctx.epoch, name, TypeError(f"metric {key} is not a number: {value!r}")
                )
                continue
            if math.isfinite(number):
                ctx.metrics[key] = number
            else:
                del ctx.metrics[key]
                self.console.print(
                    f"[yellow]analysis {name}: metric {key} is {number} at epoch {ctx.epoch}; "
                    "left out of metrics.json[/yellow]",
                    highlight=False,
                )

    def _commit(
        self,
        ctx: EpochContext,
        trained: TrainResult,
        evaluation: EvalResult,
        analysis_seconds: dict[str, float],
        started: float,
    ) -> None:
        """Write the epoch's outputs; once `models/last.pt` is written the epoch is complete."""
        assert self.writer is not None
        self._log_figures()
        epoch, state = ctx.epoch, self.state
        improved = evaluation.loss < state.best_eval_loss
        if improved:
            state.best_epoch, state.best_eval_loss = epoch, evaluation.loss
            save_checkpoint(
                self.save_dir / BEST_CHECKPOINT,
                self.model,
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
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_seconds": trained.seconds,
            "eval_seconds": evaluation.seconds,
            "analysis_seconds": analysis_seconds,
            "best": improved,
            **ctx.metrics,
        }
        row["seconds"] = time.perf_counter() - started
        state.history.append(row)
        state.epoch = epoch
        atomic_write_json(self.save_dir / "metrics.json", state.history)
        _log_scalars(self.writer, row, epoch)
        self.writer.flush()
        self.console.print(
            f"epoch {epoch}/{self.config.epochs}  train loss {trained.loss:.4f}  "
            f"eval loss {evaluation.loss:.4f}  eval accuracy {evaluation.accuracy:.2%}  "
            f"({row['seconds']:.1f} s{', best so far' if improved else ''})",
            highlight=False,
            soft_wrap=True,
        )
        self._write_report(epoch)
        # last: whatever ran above (analyses, report) may have drawn random numbers
        self._save_last()

    def _log_figures(self) -> None:
        """Wait for the figures still being rendered; log them to TensorBoard, or the failure."""
        assert self.writer is not None
        if self.renderer is None:
            return
        for figure in self.renderer.collect():
            if figure.png is None:
                assert figure.error is not None
                self._report_failure(figure.step, f"figure {figure.name}", figure.error)
            else:
                log_png(self.writer, figure.name, figure.png, figure.step)

    def _write_report(self, epoch: int) -> None:
        try:  # report.html from the files just written; like an analysis, never kills training
            from exigo.report import write_report

            write_report(self.save_dir)
        except Exception as error:
            self.failures.append((epoch, "report", f"{type(error).__name__}: {error}"))
            self.console.print(
                f"[red]report failed at epoch {epoch}:[/red] {type(error).__name__}: {error}"
            )

    def _save_last(self) -> None:
        analysis_states = {
            _analysis_name(analysis): analysis.state_dict()
            for analysis in self.analyses
            if callable(getattr(analysis, "state_dict", None))
        }
        save_checkpoint(
            self.save_dir / LAST_CHECKPOINT,
            self.model,
            **self.state.to_checkpoint(),
            config=self.config.to_dict(),
            train_size=len(self.train_data),
            val_size=len(self.val_data),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            rng=capture_rng(self.generator),
            analyses=analysis_states,
            world_size=1 if self.world is None else self.world.world_size,
        )

    def _where_things_are(self, what: str) -> str:
        """One line: in which epoch what happened, and where the outputs are."""
        epoch, state = self.current_epoch, self.state
        where = f"epoch {epoch}/{self.config.epochs}: " if epoch else "before training: "
        dropped = " (epoch not saved)" if epoch else ""
        if state.best_epoch:
            epochs = "epoch 1" if state.epoch == 1 else f"epochs 1-{state.epoch}"
            kept = (
                f"best model (epoch {state.best_epoch}): {self.save_dir / BEST_CHECKPOINT}; "
                f"metrics of {epochs}: {self.save_dir / 'metrics.json'}"
            )
        else:
            kept = "no epoch completed, no checkpoint saved"
        resume = f"; --resume continues after epoch {state.epoch}" if state.epoch else ""
        return f"{where}{what}{dropped}; {kept}; TensorBoard: {self.log_dir}{resume}"

    # ---------------------------------------------------------------- starting a run

    def start_fresh(self) -> None:
        """Replace the previous run's outputs (the lock is held) and record this run."""
        _check_replaceable(self.save_dir)
        _clear_previous_run(self.save_dir, self.state.run_name)
        self.plots_dir.mkdir(parents=True, exist_ok=True)
        (self.save_dir / "models").mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.save_dir / "run.json", self._run_info())

    def _run_info(self) -> dict[str, Any]:
        """run.json: what a reader needs to reproduce the run."""
        return {
            "run_name": self.state.run_name,
            "config": self.config.to_dict(),
            "seed": self.config.seed,
            "device": str(self.device),
            "distributed": None
            if self.world is None
            else {"world_size": self.world.world_size, "backend": self.world.backend},
            "versions": _versions(),
            "model": type(self.model).__name__,
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
            "train_size": len(self.train_data),
            "val_size": len(self.val_data),
            "class_names": self.class_names,
            "resumed": [],
        }

    def start_resumed(self) -> None:
        """Restore everything `models/last.pt` recorded; nothing in save_dir is removed.

        Raises:
            ResumeError: no `models/last.pt`, or options that differ from the run's.
            CheckpointError: `models/last.pt` is not a loadable exigo checkpoint of this model.
        """
        path = self.save_dir / LAST_CHECKPOINT
        if not path.exists():
            raise ResumeError(
                f"--resume: no {path}, so there is nothing to continue in --save-dir "
                f"{self.save_dir} (a run writes it after its first epoch); "
                "start a new run without --resume"
            )
        payload = load_checkpoint(path)
        _check_resumable(payload, self, path)
        apply_weights(payload, self.model, path)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.state = _RunState.from_checkpoint(payload)
        for analysis in self.analyses:
            saved = payload["analyses"].get(_analysis_name(analysis))
            if saved is not None and callable(getattr(analysis, "load_state_dict", None)):
                try:
                    analysis.load_state_dict(saved)
                except Exception as error:  # a lost colour scale must not stop the run
                    self._report_failure(self.state.epoch, _analysis_name(analysis), error)
        self._record_resume()
        restore_rng(payload["rng"], self.generator)  # last: nothing after this draws numbers
        if self.world is not None:
            self.resumed = payload

    def join_processes(self) -> None:
        """Under torchrun: the others take rank 0's resumed state; the model goes into DDP."""
        if self.world is None:
            return
        if self.config.resume:
            payload = self.world.broadcast_object(self.resumed)
            self.resumed = None
            if not self.is_main:
                apply_weights(payload, self.model, LAST_CHECKPOINT)
                self.optimizer.load_state_dict(payload["optimizer"])
                self.scheduler.load_state_dict(payload["scheduler"])
                self.state = _RunState.from_checkpoint(payload)
                restore_rng(payload["rng"], self.generator)
        with self.world.collective("wrapping the model in DistributedDataParallel"):
            self.trainer = wrap(self.model, self.world)

    def _record_resume(self) -> None:
        path = self.save_dir / "run.json"
        info = json.loads(path.read_text()) if _is_exigo_run(self.save_dir) else self._run_info()
        info.setdefault("resumed", []).append(
            {
                "at": _dt.datetime.now().isoformat(timespec="seconds"),
                "after_epoch": self.state.epoch,
                "device": str(self.device),
                "versions": _versions(),
            }
        )
        atomic_write_json(path, info)


def _check_resumable(payload: dict[str, Any], session: _Run, path: Path) -> None:
    """Raise `ResumeError` unless `session` would continue the run `payload` recorded exactly."""
    needed = {
        *_RunState.__dataclass_fields__,
        "config",
        "optimizer",
        "scheduler",
        "rng",
        "analyses",
    }
    saved = payload.get("config")
    if not isinstance(saved, dict) or not needed <= set(payload):
        raise ResumeError(
            f"--resume: {path} is a checkpoint, but not one a run can resume from "
            f"(it lacks {', '.join(sorted(needed - set(payload)))})"
        )
    now = session.config.to_dict()
    differences = [
        f"{name} {saved.get(name)!r} then, {now.get(name)!r} now"
        for name in sorted(set(saved) | set(now))
        if name not in RESUMABLE_CHANGES and saved.get(name) != now.get(name)
    ]
    if session.config.run_name not in (None, payload["run_name"]):
        differences.append(
            f"run_name {payload['run_name']!r} then, {session.config.run_name!r} now"
        )
    if payload.get("model_class") != type(session.model).__name__:
        differences.append(
            f"model {payload.get('model_class')} then, {type(session.model).__name__} now"
        )
    for name, data in (("train_size", session.train_data), ("val_size", session.val_data)):
        if payload.get(name) != len(data):
            differences.append(f"{name} {payload.get(name)} then, {len(data)} now")
    processes = 1 if session.world is None else session.world.world_size
    if payload.get("world_size", 1) != processes:  # the schedule counts steps per process
        differences.append(f"{payload.get('world_size', 1)} process(es) then, {processes} now")
    if differences:
        raise ResumeError(
            f"--resume: the run in {session.save_dir} was started with other settings ("
            + "; ".join(differences)
            + "). Resume with the same options, or start a new run without --resume."
        )


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
    `nn.Linear` (or `classifier` attribute) receives the embedding. With `config.resume`, the
    run in `config.save_dir` continues after its last completed epoch (`models/last.pt`).

    Args:
        config: the run's settings (epochs, batch size, learning rate, seed, folders, device).
        model: the classifier to train, on any device (it is moved to the run's device).
        train_data: dataset of `(image [C, H, W], label)` pairs.
        val_data: held-out dataset, evaluated once per epoch.
        analyses: per-epoch analyses, called in order after each evaluation. Those with
            `state_dict()` / `load_state_dict()` have their state saved and restored on resume.
        class_names: display name per class; default `val_data.classes` or "0".."K-1".
        normalization: how images were made from pixels (for display and blank baselines);
            default `val_data.normalization` when present.
        console: a rich Console for progress and messages (default: stdout).

    Returns:
        The `RunResult`.

    Raises:
        SaveDirError: the save directory cannot be written, another run holds it, or it holds
            files exigo did not write. Nothing was changed.
        ResumeError: `config.resume` but nothing to resume, or different settings.
        CheckpointError: `models/last.pt` cannot be loaded into `model`.
        RunInterrupted: SIGINT or SIGTERM arrived; completed epochs are saved.
        RunDiverged: the loss became NaN or infinite; completed epochs are saved.
        DistributedError: under torchrun, another process failed or stopped answering.

    Under `torchrun`, every process calls `run`: each trains its shard through
    DistributedDataParallel with `config.batch_size` images per step, and only rank 0 writes
    (the others print nothing and return a `RunResult` with an empty history).
    """
    from rich.console import Console

    _check_run_name(config.run_name)
    with process_group(config.device, config.dist_timeout) as world:
        main = world is None or world.is_main
        lock: FolderLock | None = None
        renderer: FigureRenderer | None = None
        try:
            with all_or_none(world, "preparing --save-dir"):  # rank 0's failure stops all
                save_dir = prepare_save_dir(config.save_dir) if main else Path(config.save_dir)
                device = world.device if world is not None else resolve_device(config.device)
                embedding_module(model)  # a model without a linear layer fails before any write
                if main:
                    lock = _lock_save_dir(save_dir)
            if main:  # the helper's imports overlap ours (torch._dynamo with the optimiser)
                renderer = _figure_renderer(analyses)
                with suppress(OSError):  # no helper now: the first figure tries again, or
                    renderer.start()  # is drawn in this process
            with _StopSignals() as stop:
                with all_or_none(world, "starting the run"):
                    session = _open_run(
                        config,
                        model.to(device),
                        train_data,
                        val_data,
                        analyses,
                        class_names=class_names,
                        normalization=normalization,
                        console=(console or Console()) if main else Console(quiet=True),
                        device=device,
                        stop=stop,
                        save_dir=save_dir,
                        world=world,
                        renderer=renderer,
                    )
                session.join_processes()
                if session.state.epoch >= config.epochs:
                    session.console.print(
                        f"the run in {save_dir} already completed its {config.epochs} epochs; "
                        "nothing to resume"
                    )
                    return session.result()
                return session.train()
        finally:
            if renderer is not None:
                renderer.close()
            if lock is not None:
                lock.release()


def _figure_renderer(analyses: Sequence[Analysis]) -> FigureRenderer:
    """The run's figure renderer: a helper process when there are two CPUs or more."""
    preload = [module for a in analyses for module in getattr(a, "helper_imports", ())]
    return FigureRenderer(in_background=available_cpus() >= 2, preload=preload)


def _lock_save_dir(save_dir: Path) -> FolderLock:
    """Hold `save_dir`'s lock, or raise `SaveDirError` saying who holds it."""
    lock = FolderLock(save_dir)
    try:
        lock.acquire()
    except FolderLockedError as error:
        raise SaveDirError(
            f"--save-dir {save_dir} is in use by another exigo run ({error.holder}); "
            "wait for it to finish or choose another --save-dir"
        ) from None
    except OSError as error:
        raise SaveDirError(f"cannot lock --save-dir {save_dir}: {error}") from None
    return lock


def _open_run(
    config: Config,
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset,
    analyses: Sequence[Analysis],
    *,
    class_names: Sequence[str] | None,
    normalization: Normalization | None,
    console: Console,
    device: torch.device,
    stop: _StopSignals,
    save_dir: Path,
    world: World | None = None,
    renderer: FigureRenderer | None = None,
) -> _Run:
    """Build the run's fixed parts, then resume it or start it fresh (rank 0 only)."""
    targets = dataset_targets(val_data)
    names = [
        str(name)
        for name in (
            class_names or getattr(val_data, "classes", None) or range(int(targets.max()) + 1)
        )
    ]
    normalization = normalization or getattr(val_data, "normalization", None)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    # a DistributedSampler gives each process ceil(N / W) images per epoch
    samples = len(train_data) if world is None else -(-len(train_data) // world.world_size)
    steps_per_epoch = -(-samples // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    session = _Run(
        config=config,
        model=model,
        train_data=train_data,
        val_data=val_data,
        analyses=analyses,
        class_names=names,
        normalization=normalization,
        device=device,
        probe=_make_probe(val_data, targets, config.probe_size, len(names), normalization, device),
        console=console,
        stop=stop,
        save_dir=save_dir,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=torch.Generator().manual_seed(config.seed),
        state=_RunState(
            run_name=config.run_name or _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        ),
        world=world,
        renderer=renderer,
    )
    if not session.is_main:
        pass  # rank 0 reads or writes save_dir; join_processes() shares what it resumed
    elif config.resume:
        session.start_resumed()
    else:
        session.start_fresh()
    return session


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
    """The metrics rows of the run in `save_dir` (its metrics.json).

    Args:
        save_dir: the run's `--save-dir`.

    Returns:
        One dict per completed epoch: `epoch`, `train_loss`, `eval_loss`, `eval_accuracy`,
        `seconds` and every scalar the analyses added.
    """
    return json.loads((Path(save_dir) / "metrics.json").read_text())

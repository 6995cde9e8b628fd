"""The epoch loop: train, evaluate once, hand the evaluation to every analysis, record the run.

```
run(config, model, train_data, val_data, analyses)
  start:      lock save_dir; resume from models/last.pt, or replace the previous run's outputs
  per epoch:  fit: train_epoch -> TrainResult, evaluate -> EvalResult (one pass over val_data)
              analyse: analysis(EpochContext) for each analysis (a failing one is logged, skipped)
              commit: the epoch's figures, models/best.pt if eval loss fell, metrics.json row,
                      TensorBoard, report.html, models/last.pt (all that --resume needs)
```

This module is `run()` and the loop; the steps live in `exigo.engine` (`epoch`: fit, analyse,
commit; `session`: the run's parts and how it starts or resumes; `world`: one process or
torchrun's; `run_dir`, `resume`, `signals`, `events`, `checkpoint`), the extension API in
`exigo.analysis`.

Outputs in `config.save_dir`: `plots/`, `models/best.pt` and `models/last.pt`,
`metrics.json`, `run.json`, `report.html`, and TensorBoard events in `logs/<run-name>/`. A new
run replaces the previous run's plots, models and metrics there; TensorBoard runs accumulate
side by side.

What a run survives:

- Another run on the same `save_dir`: it holds `save_dir/.lock` and the second run stops with
  `SaveDirError` before touching anything.
- SIGINT (Ctrl-C) or SIGTERM: the run stops at the next batch, between two analyses or at an
  analysis' next forward pass, drops what is not committed (the epoch training and, beside
  it, the epoch being analysed), closes TensorBoard and raises `RunInterrupted`; a second
  signal stops it at once. Every file is written atomically, so even `kill -9` leaves complete
  files.
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

import gc
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.data import Dataset

from exigo._system import available_cpus
from exigo.analysis import Analysis, CostShape
from exigo.config import Config
from exigo.data import Normalization, class_names_of, gather
from exigo.engine.budget import plan_budget
from exigo.engine.checkpoint import capture_rng
from exigo.engine.devices import torch_threads
from exigo.engine.epoch import Background, EpochEnd, analyse, context, fit, same_random_state
from exigo.engine.events import EventLog
from exigo.engine.resume import ResumeError
from exigo.engine.run_dir import SaveDirError, lock_save_dir, prepare_save_dir
from exigo.engine.session import RunResult, Session
from exigo.engine.signals import RunInterrupted, StopSignals
from exigo.engine.training import DivergenceError
from exigo.engine.world import World, open_world
from exigo.figures.pool import FigurePool, figure_workers
from exigo.models import OutputFn, check_model

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "ResumeError",
    "RunDiverged",
    "RunInterrupted",
    "RunResult",
    "SaveDirError",
    "run",
]


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


def run(
    config: Config,
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset,
    analyses: Sequence[Analysis] = (),
    *,
    class_names: Sequence[str] | None = None,
    normalization: Normalization | None = None,
    output_fn: OutputFn | None = None,
    embedding_layer: str | None = None,
    console: Console | None = None,
    verbose: bool = True,
    figure_pool: FigurePool | None = None,
) -> RunResult:
    """Train `model` for `config.epochs` epochs and analyse it after each one.

    Works for any classifier of [N, C, H, W] images whose forward returns the [N, K] logits,
    a tuple or list starting with them, or a mapping with a `logits` entry (`output_fn` for
    anything else): one forward pass of two validation images checks it before anything is
    written, and any model but a plain one is wrapped once in `exigo.models.AsClassifier`.
    The embedding is the input of its `classifier` attribute, or of its last `nn.Linear`, or
    of the module named `embedding_layer`. With `config.resume`, the run in `config.save_dir`
    continues after its last completed epoch (`models/last.pt`).

    Args:
        config: the run's settings (epochs, batch size, learning rate, seed, folders, device).
        model: the classifier to train, on any device (it is moved to the run's device).
        train_data: dataset of `(image [C, H, W], label)` pairs.
        val_data: held-out dataset, evaluated once per epoch.
        analyses: per-epoch analyses (`exigo.analysis.Analysis` subclasses with distinct
            names), called in order after each evaluation.
        class_names: display name per class; default `val_data.classes` or "0".."K-1".
        normalization: how images were made from pixels (for display and blank baselines);
            default `val_data.normalization` when present.
        output_fn: turns the model's output into the [N, K] logits tensor (default: the
            tensor itself, the first element of a tuple or list, a mapping's `logits`).
        embedding_layer: name of the module whose input is the embedding (`"head.3"`);
            default `config.embedding_layer`, else the classifier's input.
        console: a rich Console for progress and messages (default: stdout).
        verbose: print the closing line when the run ends (`RunResult.closing_line`: the
            report, the best model, the TensorBoard command); `console=Console(quiet=True)`
            silences everything.
        figure_pool: where the figures are drawn: a `FigurePool` the caller started early
            (`runner.py` starts its worker before it imports torch, so the worker's imports
            overlap its own); `run` closes it when it ends, as its own. It should preload the
            analyses' `worker_imports`, or its first figure imports them. Default: one
            worker on rank 0 when two CPUs or more are available (none otherwise). Ignored
            (closed at once) on the other torchrun processes, which draw nothing.

    Returns:
        The `RunResult`.

    Raises:
        TypeError: an analysis that is not an `Analysis`, or two with the same name.
        ModelError: the model does not fit the data (channels, output shape, a failing
            forward pass, an unknown `embedding_layer`); nothing was written.
        SaveDirError: the save directory cannot be written, another run holds it, or it holds
            files exigo did not write. Nothing was changed.
        ResumeError: `config.resume` but nothing to resume, or different settings.
        CheckpointError: `models/last.pt` cannot be loaded into `model`.
        PreflightError: one training step with these options fails; nothing was changed.
        RunInterrupted: SIGINT or SIGTERM arrived; completed epochs are saved.
        RunDiverged: the loss became NaN or infinite; completed epochs are saved.
        DistributedError: under torchrun, another process failed or stopped answering.

    Under `torchrun`, every process calls `run`: each trains its shard through
    DistributedDataParallel with `config.batch_size` images per step, and only rank 0 writes
    (the others print nothing and return a `RunResult` with an empty history).
    """
    from rich.console import Console

    started = time.perf_counter()
    with ExitStack() as stack:
        if figure_pool is not None:  # closed however the run ends (close() is idempotent)
            stack.callback(figure_pool.close)
        _check_analyses(analyses)
        world = stack.enter_context(open_world(config.device, config.dist_timeout))
        console = (console or Console()) if world.is_main else Console(quiet=True)
        with world.all_or_none("preparing --save-dir"):  # rank 0's failure stops all
            names = class_names_of(val_data, class_names)
            first_two = gather(val_data, range(min(2, len(val_data))))[0].to(world.device)
            model = check_model(  # before any write: a model that does not fit stops here
                model.to(world.device),
                first_two,
                len(names),
                output_fn=output_fn,
                embedding_layer=embedding_layer or config.embedding_layer,
            )
            save_dir = prepare_save_dir(config.save_dir) if world.is_main else config.save_dir
            if world.is_main:
                stack.callback(lock_save_dir(save_dir).release)
        # the worker's imports overlap ours (torch._dynamo with the optimiser)
        if figure_pool is not None and world.is_main:
            figures = figure_pool
        else:
            if figure_pool is not None:
                figure_pool.close()
            figures = stack.enter_context(_figure_pool(analyses, world, console))
        stop = stack.enter_context(StopSignals())
        stack.enter_context(torch_threads(config.threads))  # as runner.py; restored after
        with world.all_or_none("starting the run"):
            session = Session.open(
                config,
                model,
                train_data,
                val_data,
                analyses,
                class_names=names,
                normalization=normalization,
                world=world,
                console=console,
                stop=stop,
                figures=figures,
                save_dir=Path(save_dir),
            )
        if session.previous_run is not None:  # put back unless an epoch is committed
            stack.enter_context(session.previous_run)
        session.join()
        stack.enter_context(_heap_frozen())
        _plan_budget(session)
        session.timed("setup", started)
        if session.state.epoch >= config.epochs:
            console.print(
                f"the run in {save_dir} already completed its {config.epochs} epochs; "
                "nothing to resume"
            )
            return session.result()
        result = _epochs(session)
    if stop.received is not None:  # arrived while the run closed its files: still a stop
        interrupt = RunInterrupted(stop.received)
        interrupt.args = (session.where_things_are(f"interrupted by {interrupt.signal_name}"),)
        interrupt.result = result
        raise interrupt
    if verbose:
        console.print(result.closing_line, highlight=False, soft_wrap=True)
    return result


def _epochs(session: Session) -> RunResult:
    """The epoch loop; a stop or a divergence becomes an exception carrying the result."""
    config, world = session.config, session.world
    background = Background(session, overlap=_overlap(session))
    try:
        with _event_log(session), background:
            if session.state.epoch == 0:
                _before_training(session)
            first_epoch, randomness = session.state.epoch + 1, capture_rng()
            for epoch in range(first_epoch, config.epochs + 1):
                started = time.perf_counter()
                session.current_epoch = epoch
                trained, evaluation = fit(session, epoch)
                if epoch == first_epoch and background.overlap:  # nothing ran beside it
                    background.overlap = _training_draws_no_random_numbers(session, randomness)
                try:  # epoch - 1 analysed and committed: one copy alive at a time
                    background.wait()
                except RunInterrupted as interrupt:  # the others wait in `stop_together`
                    world.tell_stop(interrupt.signal_number)
                    raise
                if world.is_main:  # rank 0 analyses and writes; beside the next epoch if overlapped
                    background.start(
                        _epoch_end(session, background, epoch, trained, evaluation, started)
                    )
                world.stop_together(session.stop)
                if not world.is_main:
                    session.state.epoch = epoch
        session.stop.check()  # a signal during the last epoch's analyses or commit
    except RunInterrupted as interrupt:
        where = session.where_things_are(f"interrupted by {interrupt.signal_name}")
        if interrupt.cut_short:
            where += f"; the signal cut the analysis {interrupt.cut_short} short"
        interrupt.args = (where,)
        interrupt.result = session.result()
        raise
    except DivergenceError as error:
        message = session.where_things_are(f"{error}; --lr is {config.lr:g}")
        raise RunDiverged(message, session.result()) from None
    return session.result()


@contextmanager
def _heap_frozen() -> Iterator[None]:
    """The objects alive as the epochs start stay out of the garbage collector's way till the end.

    After every epoch's analyses `analyse` runs `gc.collect()` (matplotlib figures are
    reference cycles), and Python runs full collections of its own as objects pile up. Each
    walks every live object: 0.28 s for the ~400,000 that torch, torchvision, matplotlib and
    the data leave (measured here), holding the interpreter lock against training. `gc.freeze()`
    moves them out of those walks (the collection then takes milliseconds); `gc.unfreeze()`
    gives them back when the run ends, so nothing stays frozen after `run()`. A process that
    froze its heap itself is left as it is (`gc.unfreeze` does not nest).
    """
    if gc.get_freeze_count():  # the caller froze its heap (say before forking): theirs to undo
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _epoch_end(
    session: Session,
    background: Background,
    epoch: int,
    trained: Any,
    evaluation: Any,
    started: float,
) -> EpochEnd:
    """The epoch as it ended; a copy when it is analysed beside the next epoch.

    A model that cannot be deep-copied (it holds a lock, a file, a non-leaf tensor) is
    analysed after each epoch instead, and the run says so once.
    """
    if background.overlap:
        try:
            return EpochEnd.capture(session, epoch, trained, evaluation, started, copy_state=True)
        except Exception as error:  # deepcopy raises TypeError, RuntimeError, pickle errors
            background.overlap = False
            session.console.print(
                "analyses run after each epoch from now on, not beside the next one: the model "
                f"cannot be copied ({type(error).__name__}: {error})",
                highlight=False,
                soft_wrap=True,
            )
    return EpochEnd.capture(session, epoch, trained, evaluation, started, copy_state=False)


def _plan_budget(session: Session) -> None:
    """Fit the analyses' passes to `--analysis-budget` (`exigo.engine.budget`); say so once."""
    probe = session.probe.images
    shape = CostShape(
        probe_images=probe.shape[0],
        num_classes=len(session.class_names),
        image_shape=tuple(probe.shape[1:]),  # type: ignore[arg-type]
        training_images=len(session.train_data),
    )
    training_passes = session.world.samples_per_epoch(len(session.train_data))
    line = plan_budget(session.analyses, shape, training_passes, session.config.analysis_budget)
    if line is not None:
        session.console.print(line, highlight=False, soft_wrap=True)


def _overlap(session: Session) -> bool:
    """Whether each epoch's analyses run beside the next epoch's training (rank 0, 2+ CPUs)."""
    if session.config.sequential or not session.world.is_main:
        return False
    if available_cpus() < 2:
        session.console.print(
            "analyses run after each epoch, not beside the next one: only one CPU is available"
        )
        return False
    return True


def _training_draws_no_random_numbers(session: Session, before: dict[str, Any]) -> bool:
    """Whether the first epoch trained here left the global random generators as they were.

    If it drew from them (dropout, augmentation), analyses on another thread could change
    which numbers it draws: the run goes on sequentially, and says so once.
    """
    if same_random_state(before, capture_rng()):
        return True
    session.console.print(
        "analyses run after each epoch from now on, not beside the next one: the model draws "
        "random numbers while it trains (dropout, augmentation), and analyses on another thread "
        "would change which ones (results stay reproducible this way)",
        highlight=False,
        soft_wrap=True,
    )
    return False


def _before_training(session: Session) -> None:
    """The analyses that explain the untrained model (epoch 0, `before_training = True`)."""
    if session.world.is_main:
        early = [analysis for analysis in session.analyses if analysis.before_training]
        analyse(session, context(session, 0, None), early)
    session.world.stop_together(session.stop)


@contextmanager
def _event_log(session: Session) -> Iterator[None]:
    """TensorBoard events on rank 0 while the epochs run.

    A resumed run hides a stopped attempt's events after its last completed epoch.
    """
    if session.world.is_main:
        purge_step = session.state.epoch + 1 if session.state.epoch else None
        session.events = EventLog(session.log_dir, purge_step=purge_step)
    try:
        yield
    finally:
        if session.events is not None:
            session.events.close()
            session.events = None


def _figure_pool(analyses: Sequence[Analysis], world: World, console: Console) -> FigurePool:
    """The run's figure pool: one worker process on rank 0 when there are two CPUs or more.

    The worker starts at once, so its imports overlap the first epoch, when some analysis
    declares a figure; otherwise it is not started (its imports would only take CPU from the
    training).
    """
    drawing = any(analysis.figures for analysis in analyses)
    workers = figure_workers(world.is_main)
    if world.is_main and not workers and drawing:
        console.print("figures are drawn in the run's process: only one CPU is available")
    # torch: the figures' data arrive as tensors (1-2 CPU-s to import, better while epoch 1 trains)
    preload = ["torch", *(module for analysis in analyses for module in analysis.worker_imports)]
    pool = FigurePool(workers=workers, preload=preload, log=console.print)
    if drawing:
        pool.start()
    return pool


def _check_analyses(analyses: Sequence[Analysis]) -> None:
    """Each analysis an `Analysis` with its own name, each figure name declared once."""
    names: set[str] = set()
    figures: set[str] = set()
    for analysis in analyses:
        if not isinstance(analysis, Analysis):
            raise TypeError(
                f"{analysis!r} is not an analysis: subclass exigo.analysis.Analysis "
                "(it declares the hooks and figures the pipeline calls and shows)"
            )
        if not analysis.name or analysis.name in names:
            raise TypeError(
                f"{type(analysis).__name__}: every analysis needs its own `name` "
                f"({analysis.name!r} is {'empty' if not analysis.name else 'taken'})"
            )
        names.add(analysis.name)
        for info in analysis.figures:
            if info.name in figures:
                raise TypeError(
                    f"{type(analysis).__name__}: figure {info.name!r} is declared twice"
                )
            figures.add(info.name)

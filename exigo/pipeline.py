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

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn
from torch.utils.data import Dataset

from exigo._system import available_cpus
from exigo.analysis import Analysis
from exigo.config import Config
from exigo.data import Normalization
from exigo.engine.epoch import analyse, commit, context, fit
from exigo.engine.events import EventLog
from exigo.engine.resume import ResumeError
from exigo.engine.run_dir import SaveDirError, lock_save_dir, prepare_save_dir
from exigo.engine.session import RunResult, Session
from exigo.engine.signals import RunInterrupted, StopSignals
from exigo.engine.training import DivergenceError
from exigo.engine.world import World, open_world
from exigo.figures.pool import FigurePool
from exigo.models import embedding_module

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
        analyses: per-epoch analyses (`exigo.analysis.Analysis` subclasses with distinct
            names), called in order after each evaluation.
        class_names: display name per class; default `val_data.classes` or "0".."K-1".
        normalization: how images were made from pixels (for display and blank baselines);
            default `val_data.normalization` when present.
        console: a rich Console for progress and messages (default: stdout).

    Returns:
        The `RunResult`.

    Raises:
        TypeError: an analysis that is not an `Analysis`, or two with the same name.
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

    started = time.perf_counter()
    _check_analyses(analyses)
    with ExitStack() as stack:
        world = stack.enter_context(open_world(config.device, config.dist_timeout))
        console = (console or Console()) if world.is_main else Console(quiet=True)
        with world.all_or_none("preparing --save-dir"):  # rank 0's failure stops all
            embedding_module(model)  # a model without a linear layer fails before any write
            save_dir = prepare_save_dir(config.save_dir) if world.is_main else config.save_dir
            if world.is_main:
                stack.callback(lock_save_dir(save_dir).release)
        # the worker's imports overlap ours (torch._dynamo with the optimiser)
        figures = stack.enter_context(_figure_pool(analyses, world, console))
        stop = stack.enter_context(StopSignals())
        with world.all_or_none("starting the run"):
            session = Session.open(
                config,
                model.to(world.device),
                train_data,
                val_data,
                analyses,
                class_names=class_names,
                normalization=normalization,
                world=world,
                console=console,
                stop=stop,
                figures=figures,
                save_dir=Path(save_dir),
            )
        session.join()
        session.timed("setup", started)
        if session.state.epoch >= config.epochs:
            console.print(
                f"the run in {save_dir} already completed its {config.epochs} epochs; "
                "nothing to resume"
            )
            return session.result()
        return _epochs(session)


def _epochs(session: Session) -> RunResult:
    """The epoch loop; a stop or a divergence becomes an exception carrying the result."""
    config, world = session.config, session.world
    try:
        with _event_log(session):
            if session.state.epoch == 0:
                _before_training(session)
            for epoch in range(session.state.epoch + 1, config.epochs + 1):
                started = time.perf_counter()
                session.current_epoch = epoch
                trained, evaluation = fit(session, epoch)
                if world.is_main:  # rank 0 analyses and writes while the others wait
                    ctx = context(session, epoch, evaluation, trained)
                    seconds = analyse(session, ctx, session.analyses)
                world.stop_together(session.stop)
                if world.is_main:
                    commit(session, ctx, trained, evaluation, seconds, started)
                session.state.epoch = epoch
    except RunInterrupted as interrupt:
        interrupt.args = (session.where_things_are(f"interrupted by {interrupt.signal_name}"),)
        interrupt.result = session.result()
        raise
    except DivergenceError as error:
        message = session.where_things_are(f"{error}; --lr is {config.lr:g}")
        raise RunDiverged(message, session.result()) from None
    return session.result()


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
    """The run's figure pool: one worker process on rank 0 when there are two CPUs or more."""
    workers = 1 if world.is_main and available_cpus() >= 2 else 0
    if world.is_main and not workers:
        console.print("figures are drawn in the run's process: only one CPU is available")
    preload = [module for analysis in analyses for module in analysis.worker_imports]
    pool = FigurePool(workers=workers, preload=preload, log=console.print)
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

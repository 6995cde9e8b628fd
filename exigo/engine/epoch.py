"""The steps of one epoch, as `exigo.pipeline`'s loop calls them: fit, then finish.

- `fit`: train one epoch and evaluate once (every process its shard), with progress bars.
- `EpochEnd.capture`: the epoch as it ended (model, optimizer, schedule, random states); a
  copy when its analyses run beside the next epoch's training.
- `finish` = `analyse` + `commit`, on rank 0:
  - `analyse`: call each analysis with the epoch's `EpochContext`; a failing one is reported
    and skipped, its non-numeric or non-finite metrics are dropped (metrics.json is strict
    JSON). The analyses see the random states the epoch ended with and leave them as they
    found them, so they never change the training that follows; a stop signal reaches them
    at their next forward pass through the model.
  - `commit`: wait for the epoch's figures, then write `best.pt`, the metrics row
    (metrics.json, TensorBoard), `report.html` and, last, `last.pt`: once `last.pt` is
    written the epoch is complete, and `--resume` continues after it.
- `Background`: where `finish` runs: on a thread beside the next epoch's training, or at once.
"""

from __future__ import annotations

import copy
import functools
import gc
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn

from exigo._modes import evaluation_mode
from exigo.analysis import Analysis, EpochContext
from exigo.engine.checkpoint import capture_rng, restore_rng
from exigo.engine.run_dir import write_metrics
from exigo.engine.session import Session
from exigo.engine.signals import RunInterrupted
from exigo.engine.training import DivergenceError, EvalResult, TrainResult, train_epoch

__all__ = [
    "Background",
    "EpochEnd",
    "analyse",
    "collect_figures",
    "commit",
    "context",
    "finish",
    "fit",
    "same_random_state",
]


def fit(session: Session, epoch: int) -> tuple[TrainResult, EvalResult]:
    """Train one epoch, then evaluate; a NaN or infinite loss raises before any analysis.

    Args:
        session: the run.
        epoch: 1-based epoch.

    Returns:
        The epoch's training result and its evaluation (whole on rank 0).

    Raises:
        DivergenceError: the training or evaluation loss is NaN or infinite.
        RunInterrupted: a stop signal arrived.
    """
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    config, world = session.config, session.world
    order = world.training_order(session.train_data, epoch, config.seed, session.generator)
    columns = (
        TextColumn("{task.description:<24}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    label = f"epoch {epoch}/{config.epochs}"
    bars = Progress(*columns, console=session.console, transient=False, disable=not world.is_main)
    with bars as progress:
        on_batch = _ticker(session, progress, f"{label} training", len(order), training=True)

        def one_pass(trainer: Any) -> TrainResult:
            return train_epoch(
                trainer,
                session.train_data,
                order,
                session.optimizer,
                session.scheduler,
                batch_size=config.batch_size,
                device=world.device,
                label_smoothing=config.label_smoothing,
                on_batch=on_batch,
                record_examples=any(analysis.training_dynamics for analysis in session.analyses),
            )

        started = time.perf_counter()
        trained = world.train_epoch(session.trainer, session.model, one_pass, len(order))
        started = session.timed("train", started)
        size = world.evaluation_size(len(session.val_data))
        evaluation = world.evaluate(
            session.model,  # not a DDP wrapper: shards differ in batch count
            session.val_data,
            batch_size=config.eval_batch_size,
            on_batch=_ticker(session, progress, f"{label} evaluating", size, training=False),
        )
        session.timed("evaluate", started)
    if not math.isfinite(evaluation.loss):
        raise DivergenceError(
            f"evaluation loss became {evaluation.loss}; the learning rate is probably too high "
            "(try a smaller --lr)"
        )
    return trained, evaluation


def _ticker(
    session: Session, progress: Any, description: str, total: int, *, training: bool
) -> Callable[[int], None]:
    """A batch callback: advance the bar, then stop here if a signal asked to."""
    task = progress.add_task(description, total=total)
    batches = 0

    def advance(images: int) -> None:
        nonlocal batches
        progress.advance(task, images)
        batches += 1
        session.world.stop_point(session.stop, batches, training=training)

    return advance


def context(
    session: Session,
    epoch: int,
    evaluation: EvalResult | None,
    trained: TrainResult | None = None,
    model: nn.Module | None = None,
) -> EpochContext:
    """The `EpochContext` the analyses of `epoch` receive.

    Args:
        session: the run.
        epoch: the epoch (0 before training).
        evaluation: its evaluation pass (None before training).
        trained: its training pass (None before training).
        model: the model the analyses explain (the epoch's copy); default the run's model.

    Returns:
        A fresh context with empty metrics.
    """
    return EpochContext(
        epoch=epoch,
        model=session.model if model is None else model,
        eval=evaluation,
        probe=session.probe,
        class_names=session.class_names,
        normalization=session.normalization,
        val_data=session.val_data,
        device=session.world.device,
        log_dir=session.log_dir,
        plots_dir=session.plots_dir,
        save_dir=session.save_dir,
        figures=session.figures,
        # one line stays one line (a path in it stays whole and copyable); the terminal wraps
        log=functools.partial(session.console.print, soft_wrap=True),
        train=trained,
        train_data=session.train_data,
    )


def analyse(
    session: Session, ctx: EpochContext, which: Sequence[Analysis], *, overlapped: bool = False
) -> dict[str, float]:
    """Call each analysis; one that raises is reported and skipped (training goes on).

    The analyses run with the model in eval mode and inside a fork of every random number
    generator (torch, CUDA, numpy, Python's): they start from the states the epoch ended with
    and leave them as they found them. A stop signal is checked before each analysis and at
    every forward pass through `ctx.model`, so a long analysis is cut short within one batch.

    Args:
        session: the run.
        ctx: the epoch's context; the analyses' metrics collect in `ctx.metrics`.
        which: the analyses to call, in order.
        overlapped: they run beside the next epoch's training (the other torchrun processes
            are training with this one, not waiting for it).

    Returns:
        Seconds per analysis name.

    Raises:
        RunInterrupted: a stop signal; `interrupt.cut_short` names the analysis it stopped.
            Under torchrun, when not overlapped, the waiting processes are told first.
    """
    seconds: dict[str, float] = {}
    stop_check = session.stop.check
    with (
        evaluation_mode(ctx.model),
        _forked_random_state(),
        _stop_at_every_forward(ctx.model, stop_check),
    ):
        for analysis in which:
            known = set(ctx.metrics)
            ctx.declared = frozenset(info.name for info in analysis.figures)
            start = time.perf_counter()
            began = False
            try:
                stop_check()
                began = True
                analysis(ctx)
            except RunInterrupted as interrupt:
                if began:  # stopped inside it, not before it
                    interrupt.cut_short = analysis.name
                if not overlapped:
                    session.world.tell_stop(interrupt.signal_number)
                raise
            except Exception as error:  # an analysis never kills training
                for key in set(ctx.metrics) - known:  # its partial metrics go with it
                    del ctx.metrics[key]
                session.report_failure(ctx.epoch, analysis.name, error)
            seconds[analysis.name] = session.timed(f"analysis/{analysis.name}", start) - start
            _keep_numeric_metrics(session, ctx, known, analysis.name)
    # matplotlib figures are reference cycles: free them now, not when the collector
    # happens to run, so memory stays flat from epoch to epoch
    gc.collect()
    return seconds


@contextmanager
def _forked_random_state() -> Iterator[None]:
    """Every global random state as it was before the block, whatever the block draws."""
    saved = capture_rng()
    try:
        yield
    finally:
        restore_rng(saved)


@contextmanager
def _stop_at_every_forward(model: nn.Module, stop_check: Callable[[], None]) -> Iterator[None]:
    """`stop_check()` before every forward pass of `model` (inside Captum's loops too)."""
    handle = model.register_forward_pre_hook(lambda _module, _inputs: stop_check())
    try:
        yield
    finally:
        handle.remove()


def same_random_state(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """Whether two `capture_rng()` results hold the same global random states.

    Args:
        first: a `capture_rng()` result.
        second: another.

    Returns:
        True when torch's (and CUDA's), numpy's and Python's states are equal.
    """
    if not torch.equal(first["torch"], second["torch"]):
        return False
    if len(first.get("cuda", [])) != len(second.get("cuda", [])) or not all(
        torch.equal(a, b)
        for a, b in zip(first.get("cuda", []), second.get("cuda", []), strict=True)
    ):
        return False
    numpy_first, numpy_second = first["numpy"], second["numpy"]
    return (
        torch.equal(numpy_first["keys"], numpy_second["keys"])
        and numpy_first["position"] == numpy_second["position"]
        and numpy_first["has_gauss"] == numpy_second["has_gauss"]
        and numpy_first["cached_gaussian"] == numpy_second["cached_gaussian"]
        and first["python"] == second["python"]
    )


def _keep_numeric_metrics(session: Session, ctx: EpochContext, known: set[str], name: str) -> None:
    """Keep an analysis' new metrics only if they are finite numbers (metrics.json is JSON)."""
    for key in [key for key in ctx.metrics if key not in known]:
        value = ctx.metrics[key]
        try:
            number = float(value)
        except (TypeError, ValueError):
            del ctx.metrics[key]
            session.report_failure(
                ctx.epoch, name, TypeError(f"metric {key} is not a number: {value!r}")
            )
            continue
        if math.isfinite(number):
            ctx.metrics[key] = number
        else:
            del ctx.metrics[key]
            session.console.print(
                f"[yellow]analysis {name}: metric {key} is {number} at epoch {ctx.epoch}; "
                "left out of metrics.json[/yellow]",
                highlight=False,
            )


def collect_figures(session: Session, share: threading.Event | None = None) -> None:
    """Wait for the figures still being drawn; log them to TensorBoard, or the failure.

    Args:
        session: the run (rank 0, its `events` open).
        share: draw figures here too only while it is set (`FigurePool.collect`); None:
            at once.
    """
    assert session.events is not None
    started = time.perf_counter()
    for figure in session.figures.collect(share):
        if figure.png is None:
            assert figure.error is not None
            session.report_failure(figure.step, f"figure {figure.name}", figure.error)
        else:
            session.events.png(figure.name, figure.png, figure.step)
    session.timed("figures", started)


@dataclass
class EpochEnd:
    """An epoch as it ended: what its analyses read and its commit writes.

    When the analyses run beside the next epoch's training, `model` is a copy and the states
    are copies: the training goes on changing the originals.

    Attributes:
        epoch: the epoch (1-based).
        trained: its training result.
        evaluation: its evaluation pass.
        started: `time.perf_counter()` when it began.
        model: the model as the epoch left it (a copy, or the run's model itself).
        optimizer: the optimizer's `state_dict()` then.
        scheduler: the schedule's `state_dict()` then.
        lr: the learning rate then.
        rng: `capture_rng(generator)` then: what `--resume` restores.
    """

    epoch: int
    trained: TrainResult
    evaluation: EvalResult
    started: float
    model: nn.Module
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    lr: float
    rng: dict[str, Any]

    @classmethod
    def capture(
        cls,
        session: Session,
        epoch: int,
        trained: TrainResult,
        evaluation: EvalResult,
        started: float,
        *,
        copy_state: bool,
    ) -> EpochEnd:
        """The epoch's end, copied when training goes on before it is committed.

        Args:
            session: the run.
            epoch: the epoch just evaluated.
            trained: its training result.
            evaluation: its evaluation.
            started: when it began.
            copy_state: copy the model, optimizer and schedule states (the next epoch trains
                while this one is analysed); False shares them (nothing trains meanwhile).

        Returns:
            The `EpochEnd`.
        """
        keep = copy.deepcopy if copy_state else (lambda value: value)
        return cls(
            epoch=epoch,
            trained=trained,
            evaluation=evaluation,
            started=started,
            model=keep(session.model),
            optimizer=keep(session.optimizer.state_dict()),
            scheduler=keep(session.scheduler.state_dict()),
            lr=session.optimizer.param_groups[0]["lr"],
            rng=capture_rng(session.generator),
        )


def finish(
    session: Session,
    ended: EpochEnd,
    *,
    overlapped: bool,
    share: threading.Event | None = None,
) -> None:
    """Analyse the epoch, then commit it (rank 0).

    A stop signal that arrives before the commit starts drops the epoch whole; one that
    arrives during the commit lets it finish: the epoch is saved whole and the run stops after.

    Args:
        session: the run.
        ended: the epoch as it ended.
        overlapped: this runs beside the next epoch's training.
        share: set while the training loop waits for this epoch: only then does this thread
            draw figures a started worker could take (`FigurePool.collect`; with no worker
            left, and for a figure the worker could not deliver, it draws at once); None:
            always. Beside training the epoch is therefore committed once the worker has
            drawn its figures, which may be later in the next epoch than if this thread drew
            them itself.

    Raises:
        RunInterrupted: a stop signal arrived before the commit.
    """
    ctx = context(session, ended.epoch, ended.evaluation, ended.trained, ended.model)
    due = [a for a in session.analyses if a.due(ended.epoch, session.config.epochs)]
    seconds = analyse(session, ctx, due, overlapped=overlapped)
    try:
        session.stop.check()
    except RunInterrupted as interrupt:
        if not overlapped:  # the other torchrun processes wait in `stop_together`
            session.world.tell_stop(interrupt.signal_number)
        raise
    commit(session, ended, ctx.metrics, seconds, share=share)


def commit(
    session: Session,
    ended: EpochEnd,
    metrics: dict[str, float],
    analysis_seconds: dict[str, float],
    *,
    share: threading.Event | None = None,
) -> None:
    """Write the epoch's outputs in order; once `models/last.pt` is written it is complete.

    Args:
        session: the run (rank 0).
        ended: the epoch as it ended.
        metrics: the scalars its analyses added.
        analysis_seconds: seconds per analysis.
        share: as in `finish`.
    """
    assert session.events is not None
    collect_figures(session, share)
    epoch, trained, evaluation, state = ended.epoch, ended.trained, ended.evaluation, session.state
    now = time.perf_counter()
    improved = evaluation.loss < state.best_eval_loss
    if improved:
        state.best_epoch, state.best_eval_loss = epoch, evaluation.loss
        session.save_best(ended.model, epoch, evaluation.loss, evaluation.accuracy)
        now = session.timed("checkpoints", now)
    row: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": trained.loss,
        "train_accuracy": trained.accuracy,
        "eval_loss": evaluation.loss,
        "eval_accuracy": evaluation.accuracy,
        "lr": ended.lr,
        "train_seconds": trained.seconds,
        "eval_seconds": evaluation.seconds,
        "analysis_seconds": analysis_seconds,
        "best": improved,
        **metrics,
    }
    row["seconds"] = now - ended.started
    failed = sorted({name for when, name, _ in session.failures if when == epoch})
    if failed:  # what the report warns about (a figure may also be missing on purpose)
        row["failed"] = failed
    state.history.append(row)
    state.epoch = epoch
    write_metrics(session.save_dir, state.history)
    session.events.scalars(row, epoch)
    session.events.flush()
    now = session.timed("metrics", now)
    session.console.print(
        f"epoch {epoch}/{session.config.epochs}  train loss {trained.loss:.4f}  "
        f"eval loss {evaluation.loss:.4f}  eval accuracy {evaluation.accuracy:.2%}  "
        f"({row['seconds']:.1f} s{', best so far' if improved else ''})",
        highlight=False,
        soft_wrap=True,
    )
    _write_report(session, epoch)
    now = session.timed("report", now)
    session.save_last(ended.model, ended.optimizer, ended.scheduler, ended.rng)
    session.drop_previous_run()  # committed: the previous run's outputs set aside can go
    session.timed("checkpoints", now)


class Background:
    """Where each epoch's `finish` runs: on one thread beside the next epoch's training, or at once.

    At most one epoch is in the background: `wait()` before the next `start()` keeps one copy
    of the model alive and the commits in epoch order. Its errors (a stop signal that cut the
    analyses short, a full disk during the commit) are raised by `wait()`, in the loop's
    thread. Leaving the block waits for the epoch in the background too; when the block itself
    raised, that error wins.

    Args:
        session: the run; the time its loop waits for the background is its
            `timings["waiting for analyses"]`.
        overlap: run in the background; False runs `finish` inside `start`.

    Attributes:
        overlap: whether `start` runs in the background (may be switched off between epochs).
    """

    def __init__(self, session: Session, overlap: bool) -> None:
        self.session = session
        self.overlap = overlap
        self._executor: ThreadPoolExecutor | None = None
        self._running: Future[None] | None = None
        # set while the loop waits for the background: only then may it draw figures a
        # started worker could take (`FigurePool.collect`)
        self._loop_waits = threading.Event()

    def start(self, ended: EpochEnd) -> None:
        """Finish `ended` (analyse and commit it), in the background when overlapping.

        Args:
            ended: the epoch to finish.
        """
        self.wait()
        if not self.overlap:
            finish(self.session, ended, overlapped=False)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="exigo-analyses")
        self._running = self._executor.submit(
            finish, self.session, ended, overlapped=True, share=self._loop_waits
        )

    def wait(self) -> None:
        """Wait for the epoch in the background; raise what it raised."""
        running, self._running = self._running, None
        if running is not None:
            started = time.perf_counter()
            try:
                error = self._outcome(running)
                if error is not None:
                    raise error
            finally:
                self.session.timed("waiting for analyses", started)

    def _outcome(self, running: Future[None]) -> BaseException | None:
        """What `running` raised, waited for with the background free to draw figures too."""
        self._loop_waits.set()
        try:
            return _exception_seeing_signals(running)
        finally:
            self._loop_waits.clear()

    def __enter__(self) -> Background:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if kind is None:
                self.wait()
            else:  # the loop's own error wins; the background still ends before we leave
                running, self._running = self._running, None
                background = None if running is None else self._outcome(running)
                if isinstance(error, RunInterrupted) and isinstance(background, RunInterrupted):
                    error.cut_short = error.cut_short or background.cut_short
        finally:
            if self._executor is not None:
                self._loop_waits.set()  # a second signal cleared it: the loop waits all the same
                self._executor.shutdown(wait=True)
                self._executor = None


#: How often a thread waiting for the background wakes up: a signal that the OS delivered to
#: another thread runs its Python handler only when the main thread runs Python code, and the
#: background (an analysis) waits for that handler's flag.
_WAKE_SECONDS = 0.1


def _exception_seeing_signals(running: Future[None]) -> BaseException | None:
    """`running.exception()`, waking up every `_WAKE_SECONDS` so signal handlers run meanwhile."""
    while True:
        try:
            return running.exception(timeout=_WAKE_SECONDS)
        except FutureTimeout:
            continue


def _write_report(session: Session, epoch: int) -> None:
    """report.html from the files just written; like an analysis, it never kills training."""
    try:
        from exigo.report import write_report

        write_report(session.save_dir)
    except Exception as error:
        session.stop_on_storage_error(error)  # a full disk stops the run, with one message
        session.failures.append((epoch, "report", f"{type(error).__name__}: {error}"))
        session.console.print(
            f"[red]report failed at epoch {epoch}:[/red] {type(error).__name__}: {error}"
        )

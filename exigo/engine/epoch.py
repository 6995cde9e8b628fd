"""The steps of one epoch, as `exigo.pipeline`'s loop calls them: fit, analyse, commit.

- `fit`: train one epoch and evaluate once (every process its shard), with progress bars.
- `analyse`: call each analysis with the epoch's `EpochContext`; a failing one is reported and
  skipped, its non-numeric or non-finite metrics are dropped (metrics.json is strict JSON).
- `commit`: wait for the epoch's figures, then write `best.pt`, the metrics row
  (metrics.json, TensorBoard), `report.html` and, last, `last.pt`: once `last.pt` is written
  the epoch is complete, and `--resume` continues after it.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from exigo.analysis import Analysis, EpochContext
from exigo.engine.run_dir import write_metrics
from exigo.engine.session import Session
from exigo.engine.signals import RunInterrupted
from exigo.engine.training import DivergenceError, EvalResult, TrainResult, train_epoch

__all__ = ["analyse", "collect_figures", "commit", "context", "fit"]


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
) -> EpochContext:
    """The `EpochContext` the analyses of `epoch` receive.

    Args:
        session: the run.
        epoch: the epoch (0 before training).
        evaluation: its evaluation pass (None before training).
        trained: its training pass (None before training).

    Returns:
        A fresh context with empty metrics.
    """
    return EpochContext(
        epoch=epoch,
        model=session.model,
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
        log=session.console.print,
        train=trained,
        train_data=session.train_data,
    )


def analyse(session: Session, ctx: EpochContext, which: Sequence[Analysis]) -> dict[str, float]:
    """Call each analysis; one that raises is reported and skipped (training goes on).

    Args:
        session: the run.
        ctx: the epoch's context; the analyses' metrics collect in `ctx.metrics`.
        which: the analyses to call, in order.

    Returns:
        Seconds per analysis name.

    Raises:
        RunInterrupted: a stop signal, checked before each analysis; under torchrun the
            waiting processes are told first.
    """
    seconds: dict[str, float] = {}
    session.model.eval()
    try:
        for analysis in which:
            session.stop.check()
            known = set(ctx.metrics)
            ctx.declared = frozenset(info.name for info in analysis.figures)
            start = time.perf_counter()
            try:
                analysis(ctx)
            except Exception as error:  # an analysis never kills training
                session.report_failure(ctx.epoch, analysis.name, error)
            seconds[analysis.name] = session.timed(f"analysis/{analysis.name}", start) - start
            _keep_numeric_metrics(session, ctx, known, analysis.name)
    except RunInterrupted as interrupt:
        session.world.tell_stop(interrupt.signal_number)
        raise
    # matplotlib figures are reference cycles: free them now, not when the collector
    # happens to run, so memory stays flat from epoch to epoch
    gc.collect()
    return seconds


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


def collect_figures(session: Session) -> None:
    """Wait for the figures still being drawn; log them to TensorBoard, or the failure.

    Args:
        session: the run (rank 0, its `events` open).
    """
    assert session.events is not None
    started = time.perf_counter()
    for figure in session.figures.collect():
        if figure.png is None:
            assert figure.error is not None
            session.report_failure(figure.step, f"figure {figure.name}", figure.error)
        else:
            session.events.png(figure.name, figure.png, figure.step)
    session.timed("figures", started)


def commit(
    session: Session,
    ctx: EpochContext,
    trained: TrainResult,
    evaluation: EvalResult,
    analysis_seconds: dict[str, float],
    started: float,
) -> None:
    """Write the epoch's outputs in order; once `models/last.pt` is written it is complete.

    Args:
        session: the run (rank 0).
        ctx: the epoch's context, its metrics filled by the analyses.
        trained: the epoch's training result.
        evaluation: its evaluation.
        analysis_seconds: seconds per analysis.
        started: `time.perf_counter()` when the epoch began.
    """
    assert session.events is not None
    collect_figures(session)
    epoch, state = ctx.epoch, session.state
    now = time.perf_counter()
    improved = evaluation.loss < state.best_eval_loss
    if improved:
        state.best_epoch, state.best_eval_loss = epoch, evaluation.loss
        session.save_best(epoch, evaluation.loss, evaluation.accuracy)
        now = session.timed("checkpoints", now)
    row: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": trained.loss,
        "train_accuracy": trained.accuracy,
        "eval_loss": evaluation.loss,
        "eval_accuracy": evaluation.accuracy,
        "lr": session.optimizer.param_groups[0]["lr"],
        "train_seconds": trained.seconds,
        "eval_seconds": evaluation.seconds,
        "analysis_seconds": analysis_seconds,
        "best": improved,
        **ctx.metrics,
    }
    row["seconds"] = now - started
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
    session.save_last()  # last: whatever ran above (analyses, report) may have drawn numbers
    session.timed("checkpoints", now)


def _write_report(session: Session, epoch: int) -> None:
    """report.html from the files just written; like an analysis, it never kills training."""
    try:
        from exigo.report import write_report

        write_report(session.save_dir)
    except Exception as error:
        session.failures.append((epoch, "report", f"{type(error).__name__}: {error}"))
        session.console.print(
            f"[red]report failed at epoch {epoch}:[/red] {type(error).__name__}: {error}"
        )

"""A run in progress: what stays fixed from epoch to epoch, its `RunState`, and how it starts.

`Session.open` builds the optimizer, schedule and probe, then starts the run afresh (replacing
the previous run's outputs) or resumes it from `models/last.pt`; `Session.join` gives the other
torchrun processes rank 0's resumed state. The epoch loop itself is in `exigo.pipeline`; the
steps it calls are in `exigo.engine.epoch`.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
import traceback
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from exigo._io import atomic_write_json, is_storage_error
from exigo.analysis import Analysis, Probe, make_probe
from exigo.data import Normalization, data_source, dataset_targets
from exigo.engine.checkpoint import (
    apply_weights,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from exigo.engine.devices import set_threads
from exigo.engine.preflight import trial_step
from exigo.engine.resume import ResumeError, RunState, check_resumable, resumed_threads
from exigo.engine.run_dir import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    PreviousRun,
    check_replaceable,
    record_resume,
    recover_previous_run,
    run_info,
)
from exigo.models import unwrapped

if TYPE_CHECKING:
    from rich.console import Console

    from exigo.config import Config
    from exigo.engine.events import EventLog
    from exigo.engine.signals import StopSignals
    from exigo.engine.world import World
    from exigo.figures.pool import FigurePool

__all__ = ["RunResult", "Session"]


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
        timings: wall seconds per phase of this process' run, summed over epochs: `setup`
            (from `run()` to the first epoch), `train`, `evaluate`, `analysis/{name}`,
            `figures` (waiting for the figure worker before a commit), `checkpoints`,
            `report`, `metrics` (metrics.json and TensorBoard scalars).
    """

    history: list[dict[str, Any]]
    best_epoch: int
    best_eval_loss: float
    failed_analyses: list[tuple[int, str, str]]
    save_dir: Path
    log_dir: Path
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def closing_line(self) -> str:
        """The line `run()` prints when it ends: report.html, the best model, TensorBoard."""
        from exigo.engine.console import closing_line

        return closing_line(self.history, self.best_epoch, self.save_dir)


@dataclass
class Session:
    """A run in progress (see the module docstring); built by `Session.open`.

    Attributes:
        config: the run's settings.
        model: the model itself, on `world.device`.
        train_data: the training set.
        val_data: the held-out set.
        analyses: the per-epoch analyses, in call order.
        class_names: display name per class.
        normalization: how images were made from pixels, or None.
        world: the processes.
        probe: the fixed probe images.
        console: where progress and messages go (quiet on ranks other than 0).
        stop: the signal flag.
        figures: the figure pool.
        save_dir: the run's folder.
        optimizer: AdamW over the model's parameters.
        scheduler: the one-cycle learning-rate schedule, stepped every batch.
        generator: the shuffling order of every epoch (saved for `--resume`).
        state: what changes from epoch to epoch (saved for `--resume`).
        trainer: what training goes through: the model, or its DDP wrapper (set by `join`).
        events: TensorBoard, on rank 0 while the epochs run.
        failures: `(epoch, name, message)` of everything that failed and was skipped.
        current_epoch: the epoch being trained (for messages).
        timings: wall seconds per phase (see `RunResult.timings`).
        threads: torch's CPU threads for this run (recorded: they change the results).
        resumed: rank 0's `models/last.pt`, until `join` has given it to the others.
        previous_run: the previous run's outputs, set aside until this run's first epoch is
            committed (rank 0 of a new run).
    """

    config: Config
    model: nn.Module
    train_data: Dataset
    val_data: Dataset
    analyses: Sequence[Analysis]
    class_names: list[str]
    normalization: Normalization | None
    world: World
    probe: Probe
    console: Console
    stop: StopSignals
    figures: FigurePool
    save_dir: Path
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # the shuffling order of every epoch
    state: RunState
    trainer: nn.Module | None = None  # what training goes through: the model, or its DDP wrapper
    events: EventLog | None = None  # TensorBoard, on rank 0 while the epochs run
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    current_epoch: int = 0  # the epoch being trained (for messages)
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    threads: int = field(default_factory=torch.get_num_threads)  # this run's, set before open
    resumed: dict[str, Any] | None = None  # rank 0's models/last.pt, until the others have it
    previous_run: PreviousRun | None = None  # set aside until this run's first commit

    @classmethod
    def open(
        cls,
        config: Config,
        model: nn.Module,
        train_data: Dataset,
        val_data: Dataset,
        analyses: Sequence[Analysis],
        *,
        class_names: Sequence[str] | None,
        normalization: Normalization | None,
        world: World,
        console: Console,
        stop: StopSignals,
        figures: FigurePool,
        save_dir: Path,
    ) -> Session:
        """Build the run's fixed parts, then (on rank 0) resume it or start it afresh.

        Args:
            config: the run's settings.
            model: the classifier, already on `world.device`.
            train_data: the training set.
            val_data: the held-out set.
            analyses: the per-epoch analyses.
            class_names: display names, or None (`val_data.classes`, else "0".."K-1").
            normalization: how images were made from pixels, or None (`val_data.normalization`).
            world: the processes.
            console: where messages go.
            stop: the signal flag.
            figures: the figure pool.
            save_dir: the run's folder (locked on rank 0).

        Returns:
            The session, at epoch 0 or at the resumed run's last completed epoch.

        Raises:
            SaveDirError: the folder holds files exigo did not write.
            ResumeError: nothing to resume, or other settings.
            CheckpointError: `models/last.pt` cannot be loaded into `model`.
        """
        targets = dataset_targets(val_data)
        names = [
            str(name)
            for name in (
                class_names or getattr(val_data, "classes", None) or range(int(targets.max()) + 1)
            )
        ]
        normalization = normalization or getattr(val_data, "normalization", None)
        optimizer, scheduler = _training_parts(model, config, world, len(train_data))
        run_name = config.run_name or _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        session = cls(
            config=config,
            model=model,
            train_data=train_data,
            val_data=val_data,
            analyses=analyses,
            class_names=names,
            normalization=normalization,
            world=world,
            probe=make_probe(
                val_data, targets, config.probe_size, len(names), normalization, world.device
            ),
            console=console,
            stop=stop,
            figures=figures,
            save_dir=save_dir,
            optimizer=optimizer,
            scheduler=scheduler,
            generator=torch.Generator().manual_seed(config.seed),
            state=RunState(run_name=run_name),
        )
        if world.is_main:  # the others receive rank 0's resumed state in `join`
            session.start_resumed() if config.resume else session.start_fresh()
        return session

    def training_parts(
        self, model: nn.Module
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """A new optimizer and schedule like the run's, over `model`'s parameters.

        Args:
            model: the model (or a copy of it: `exigo.engine.preflight.trial_step`).

        Returns:
            `(optimizer, scheduler)` in their initial state.
        """
        return _training_parts(model, self.config, self.world, len(self.train_data))

    @property
    def log_dir(self) -> Path:
        """The TensorBoard run folder."""
        return self.save_dir / "logs" / self.state.run_name

    @property
    def plots_dir(self) -> Path:
        """Where figures go."""
        return self.save_dir / "plots"

    def result(self) -> RunResult:
        """The `RunResult` of the epochs completed so far.

        Returns:
            History, best epoch, failures, folders and timings.
        """
        return RunResult(
            history=self.state.history,
            best_epoch=self.state.best_epoch,
            best_eval_loss=self.state.best_eval_loss,
            failed_analyses=self.failures,
            save_dir=self.save_dir,
            log_dir=self.log_dir,
            timings=dict(self.timings),
        )

    def timed(self, phase: str, since: float) -> float:
        """Add the seconds since `since` to `timings[phase]`.

        Args:
            phase: the timing's name.
            since: a `time.perf_counter()` reading.

        Returns:
            Now (`time.perf_counter()`), to time the next phase from.
        """
        now = time.perf_counter()
        self.timings[phase] += now - since
        return now

    # ---------------------------------------------------------------- starting a run

    def start_fresh(self) -> None:
        """Check all that can be checked, then set the previous run's outputs aside.

        With the lock held: the folder's own checks, run.json's content and a trial step
        (`exigo.engine.preflight.trial_step`) come first; only then are the previous run's
        outputs moved into `.previous-run/` (`PreviousRun`), to be deleted when this run's
        first epoch is committed, or put back if it fails before.

        Raises:
            SaveDirError: the folder holds files exigo did not write.
            PreflightError: the options fail at the first training step.
        """
        self._recover()
        check_replaceable(self.save_dir, self.config.data_dir)
        info = self.run_info()
        json.dumps(info, allow_nan=False)  # Config.extra that is no JSON fails here, not later
        trial_step(self)
        self.previous_run = PreviousRun.set_aside(self.save_dir, self.state.run_name)
        try:
            self.plots_dir.mkdir(parents=True, exist_ok=True)
            (self.save_dir / "models").mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.save_dir / "run.json", info)
        except BaseException:
            self.previous_run.restore()
            self.previous_run = None
            raise

    def drop_previous_run(self) -> None:
        """The first epoch is committed: the previous run's outputs set aside are deleted."""
        if self.previous_run is not None:
            self.previous_run.discard()
            self.previous_run = None

    def _recover(self) -> None:
        """Put back a previous run that a run killed before its first commit had set aside."""
        done = recover_previous_run(self.save_dir)
        if done is not None:
            self.console.print(f"[yellow]{done}[/yellow]", highlight=False, soft_wrap=True)

    def run_info(self) -> dict[str, Any]:
        """run.json's content for this run.

        Returns:
            See `exigo.engine.run_dir.run_info`.
        """
        return run_info(
            run_name=self.state.run_name,
            config=self.config.to_dict(),
            seed=self.config.seed,
            device=str(self.world.device),
            threads=self.threads,
            distributed=self.world.describe(),
            model=type(unwrapped(self.model)).__name__,
            train_size=len(self.train_data),
            val_size=len(self.val_data),
            class_names=self.class_names,
            data={
                "source": data_source(self.val_data),
                "image_shape": list(self.probe.images.shape[1:]),
                "normalization": None
                if self.normalization is None
                else {"mean": list(self.normalization.mean), "std": list(self.normalization.std)},
            },
            figures={
                info.name: {"title": info.title, "caption": info.caption, "analysis": analysis.name}
                for analysis in self.analyses
                for info in analysis.figures
            },
        )

    def start_resumed(self) -> None:
        """Restore everything `models/last.pt` recorded; nothing in save_dir is removed.

        Raises:
            ResumeError: no `models/last.pt`, or options that differ from the run's.
            CheckpointError: `models/last.pt` is not a loadable exigo checkpoint of this model.
        """
        self._recover()
        path = self.save_dir / LAST_CHECKPOINT
        if not path.exists():
            raise ResumeError(
                f"--resume: no {path}, so there is nothing to continue in --save-dir "
                f"{self.save_dir} (a run writes it after its first epoch); "
                "start a new run without --resume"
            )
        payload = load_checkpoint(path)
        check_resumable(
            payload,
            path,
            config=self.config.to_dict(),
            run_name=self.config.run_name,
            model_class=type(unwrapped(self.model)).__name__,
            train_size=len(self.train_data),
            val_size=len(self.val_data),
            world_size=self.world.world_size,
            save_dir=self.save_dir,
        )
        self._restore(payload)
        for analysis in self.analyses:
            saved = payload["analyses"].get(analysis.name)
            if saved is not None:
                try:
                    analysis.load_state_dict(saved)
                except Exception as error:  # a lost colour scale must not stop the run
                    self.report_failure(self.state.epoch, analysis.name, error)
        if self.state.epoch < self.config.epochs:
            trial_step(self)  # on copies: the restored state stays as it is
        record_resume(self.save_dir, self.state.epoch, str(self.world.device), self.run_info())
        restore_rng(payload["rng"], self.generator)  # last: nothing after this draws numbers
        self.resumed = payload

    def _restore(self, payload: dict[str, Any]) -> None:
        threads = resumed_threads(payload, self.config.threads, force=self.config.force)
        if threads is not None and threads != torch.get_num_threads():
            self.console.print(
                f"--resume: {threads} CPU threads, as the run trained with (--threads), so "
                "its metrics go on as an uninterrupted run's would"
            )
            set_threads(threads)
            self.threads = threads
        elif self.config.force and payload.get("threads") not in (None, self.config.threads):
            self.console.print(
                f"[yellow]--force: {self.config.threads} CPU threads instead of the run's "
                f"{payload['threads']}; its metrics will differ from an uninterrupted run's"
                "[/yellow]"
            )
        apply_weights(payload, unwrapped(self.model), LAST_CHECKPOINT)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.state = RunState.from_checkpoint(payload)

    def join(self) -> None:
        """The other processes take rank 0's resumed state; training goes through `prepare`."""
        if self.config.resume:
            payload = self.world.broadcast_object(self.resumed)
            if not self.world.is_main:
                self._restore(payload)
                restore_rng(payload["rng"], self.generator)
        self.resumed = None
        self.trainer = self.world.prepare(self.model)

    # ---------------------------------------------------------------- during the run

    def report_failure(self, epoch: int, name: str, error: BaseException) -> None:
        """Record a failed analysis (or figure, or report) and print it; the run goes on.

        The traceback is printed the first time each name fails: enough to find the bug.

        Args:
            epoch: when it failed.
            name: what failed.
            error: the exception.

        Raises:
            OSError: `error` itself when the run's files cannot be written (a full disk,
                a read-only folder): that stops the run, with one message.
        """
        self.stop_on_storage_error(error)
        first_time = all(failed != name for _, failed, _ in self.failures)
        self.failures.append((epoch, name, f"{type(error).__name__}: {error}"))
        self.console.print(
            f"[red]analysis {name} failed at epoch {epoch}:[/red] {type(error).__name__}: {error}",
            highlight=False,
            soft_wrap=True,
        )
        if first_time:
            trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            self.console.print(trace, markup=False, highlight=False, soft_wrap=True)

    def stop_on_storage_error(self, error: BaseException) -> None:
        """Raise `error` if it means the run's files cannot be written (`is_storage_error`).

        A full disk is no failed analysis: every later write would fail too, so the run
        stops with one message naming the file instead of one traceback per figure.

        Args:
            error: what an analysis, a figure or the report raised.

        Raises:
            OSError: `error`, when it is a storage error.
        """
        if is_storage_error(error, self.save_dir):
            raise error

    def save_best(
        self, model: nn.Module, epoch: int, eval_loss: float, eval_accuracy: float
    ) -> None:
        """Write `models/best.pt`: the model's weights and the epoch's evaluation.

        Args:
            model: the model as the epoch left it.
            epoch: the epoch.
            eval_loss: its evaluation loss.
            eval_accuracy: its held-out accuracy.
        """
        save_checkpoint(
            self.save_dir / BEST_CHECKPOINT,
            unwrapped(model),  # the user's own state_dict: no "model." prefix
            epoch=epoch,
            eval_loss=eval_loss,
            eval_accuracy=eval_accuracy,
        )

    def save_last(
        self,
        model: nn.Module,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        rng: dict[str, Any],
    ) -> None:
        """Write `models/last.pt`: everything `--resume` needs (after all else of the epoch).

        Args:
            model: the model as the epoch left it.
            optimizer: the optimizer's `state_dict()` then.
            scheduler: the schedule's `state_dict()` then.
            rng: `capture_rng(generator)` then.
        """
        save_checkpoint(
            self.save_dir / LAST_CHECKPOINT,
            unwrapped(model),
            **self.state.to_checkpoint(),
            config=self.config.to_dict(),
            train_size=len(self.train_data),
            val_size=len(self.val_data),
            optimizer=optimizer,
            scheduler=scheduler,
            rng=rng,
            analyses={
                analysis.name: state
                for analysis in self.analyses
                if (state := analysis.state_dict())
            },
            world_size=self.world.world_size,
            threads=self.threads,  # it changes the results: --resume holds to it
        )

    def where_things_are(self, what: str) -> str:
        """One line: in which epoch `what` happened, what was kept, and where the outputs are.

        Args:
            what: what happened ("interrupted by SIGINT").

        Returns:
            The line: every epoch up to `state.epoch` is committed whole, the later ones
            (`state.epoch + 1` to `current_epoch`) are dropped whole.
        """
        epoch, state = self.current_epoch, self.state
        where = f"epoch {epoch}/{self.config.epochs}: " if epoch else "before training: "
        lost = list(range(state.epoch + 1, epoch + 1))
        if not lost:
            dropped = f" (epoch {epoch} was saved whole)" if epoch else ""
        elif len(lost) == 1:
            dropped = f" (epoch {lost[0]} not saved)"
        else:
            dropped = f" (epochs {lost[0]}-{lost[-1]} not saved)"
        if state.best_epoch:
            epochs = "epoch 1" if state.epoch == 1 else f"epochs 1-{state.epoch}"
            kept = (
                f"best model (epoch {state.best_epoch}): {self.save_dir / BEST_CHECKPOINT}; "
                f"metrics of {epochs}: {self.save_dir / 'metrics.json'}"
            )
        else:
            kept = "no epoch completed, no checkpoint saved"
        resume = f"; --resume continues after epoch {state.epoch}" if state.epoch else ""
        tensorboard = f"; TensorBoard: {self.log_dir}"
        if self.previous_run is not None:  # put back as this run ends (reliability)
            kept, tensorboard = f"{kept}; --save-dir {self.save_dir} is back as it was", ""
        return f"{where}{what}{dropped}; {kept}{tensorboard}{resume}"


def _training_parts(
    model: nn.Module, config: Config, world: World, train_size: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over `model`'s parameters and its one-cycle schedule over all epochs' steps."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = -(-world.samples_per_epoch(train_size) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    return optimizer, scheduler

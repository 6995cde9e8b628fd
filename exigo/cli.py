"""Command line of `python runner.py`: MNIST, the default CNN and the default analyses.

Exit codes:

- 0: success.
- 1: the run finished but an analysis failed, or a write failed (disk full, read-only).
- 2: bad options, data, save directory (unwritable, or in use by another run) or `--resume`
  (nothing to resume, different options): checked before training, nothing was trained.
- 3: the loss became NaN or infinite; the best checkpoint of earlier epochs is kept.
- 4: under torchrun, another process failed or stopped answering (its own message, named
  in torchrun's summary, is the cause).
- 130 / 143: stopped by SIGINT (Ctrl-C) / SIGTERM; completed epochs are kept (`--resume`).

Under torchrun (`torchrun --nproc_per_node=N runner.py ...`) every process runs this command
line; rank 0 prints and writes, the others print only their own errors.

Expected failures print one message without a traceback; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from exigo.config import Config

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from torch import nn

__all__ = ["build_parser", "config_from_args", "default_model", "main", "run_and_exit"]

_DEFAULTS = Config()


def _number(text: str) -> float:
    """A float; the range is `Config`'s to check (it rejects NaN and infinity where needed)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; defaults come from `Config` so the help cannot drift from them.

    Returns:
        A parser for `runner.py`'s options, one `Config` field per option.
    """
    parser = argparse.ArgumentParser(
        prog="runner.py",
        description=(
            "Train a small CNN on MNIST and watch it learn: after every epoch exigo writes a "
            "confusion matrix, saliency maps and an embedding projection to --save-dir and "
            "TensorBoard, and keeps the best model."
        ),
        allow_abbrev=False,  # `--epoch 3` is not silently `--epochs 3`
    )
    train = parser.add_argument_group("training")
    train.add_argument(
        "--epochs",
        type=int,
        default=_DEFAULTS.epochs,
        help="passes over the training set (default: %(default)s)",
    )
    train.add_argument(
        "--batch-size",
        type=int,
        default=_DEFAULTS.batch_size,
        help="training images per optimizer step (default: %(default)s)",
    )
    train.add_argument(
        "--lr",
        type=_number,
        default=_DEFAULTS.lr,
        help="peak learning rate of the one-cycle schedule (AdamW) (default: %(default)s)",
    )
    train.add_argument(
        "--weight-decay",
        type=_number,
        default=_DEFAULTS.weight_decay,
        help="AdamW weight decay (default: %(default)s)",
    )
    train.add_argument(
        "--label-smoothing",
        type=_number,
        default=_DEFAULTS.label_smoothing,
        help="cross-entropy label smoothing in [0, 1) (default: %(default)s)",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=_DEFAULTS.seed,
        help="seed of model init, shuffling and analyses; same seed, same metrics on the CPU "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--device",
        default=_DEFAULTS.device,
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps (default: %(default)s)",
    )
    train.add_argument(
        "--dist-timeout",
        type=_number,
        default=_DEFAULTS.dist_timeout,
        metavar="SECONDS",
        help="under torchrun: how long a process waits for the others before it fails "
        "(raise it when rank 0's analyses take longer) (default: %(default)s)",
    )
    files = parser.add_argument_group("files")
    files.add_argument(
        "--data-dir",
        type=Path,
        default=_DEFAULTS.data_dir,
        help="torchvision root holding MNIST/raw/ (downloaded there if absent; "
        "offline: ../shared/mnist) (default: %(default)s)",
    )
    files.add_argument(
        "--no-download",
        dest="download",
        action="store_false",
        help="fail instead of downloading when the data is absent",
    )
    files.add_argument(
        "--save-dir",
        type=Path,
        default=_DEFAULTS.save_dir,
        help="outputs of the run: plots/, models/, metrics.json, logs/ "
        "(a new run replaces the previous run's files) (default: %(default)s)",
    )
    files.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --save-dir from its last completed epoch (models/last.pt), "
        "with the same options",
    )
    files.add_argument(
        "--run-name",
        type=str,
        default=None,
        help="TensorBoard run folder under SAVE_DIR/logs (default: start time)",
    )
    analysis = parser.add_argument_group("analyses")
    analysis.add_argument(
        "--probe-size",
        type=int,
        default=_DEFAULTS.probe_size,
        help="fixed validation images explained every epoch (one per class) (default: %(default)s)",
    )
    analysis.add_argument(
        "--confusion-normalize",
        action="store_true",
        help="also draw the row-normalised confusion matrix (each row sums to 1: the diagonal "
        "is recall)",
    )
    analysis.add_argument(
        "--projection-limit",
        type=int,
        default=_DEFAULTS.projection_limit,
        help="at most this many validation points in the projector and the t-SNE "
        "(stratified by class, the same points every epoch; 0 turns the projection off) "
        "(default: %(default)s)",
    )
    analysis.add_argument(
        "--no-attribution-checks",
        dest="attribution_checks",
        action="store_false",
        help="skip comparing attribution methods and their sanity checks",
    )
    analysis.add_argument(
        "--check-size",
        type=int,
        default=_DEFAULTS.check_size,
        help="held-out images the attribution checks run on, stratified by class, the same "
        "every epoch (the checks' cost grows with it) (default: %(default)s)",
    )
    analysis.add_argument(
        "--eval-batch-size",
        type=int,
        default=_DEFAULTS.eval_batch_size,
        help="images per forward pass during evaluation (default: %(default)s)",
    )
    train.add_argument(
        "--threads",
        type=int,
        default=_DEFAULTS.threads,
        help="CPU threads of torch's operators (0: OMP_NUM_THREADS if set, else half the "
        "CPUs; more threads are faster only on idle cores, and far slower on busy ones) "
        "(default: %(default)s)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The frozen `Config` for parsed arguments (every field not on the CLI keeps its default).

    Args:
        args: the namespace `build_parser().parse_args()` returned.

    Returns:
        The run's configuration.

    Raises:
        ValueError: a value `Config` rejects, naming the field.
    """
    fields = set(Config.__dataclass_fields__)
    return Config(**{key: value for key, value in vars(args).items() if key in fields})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the MNIST pipeline from the command line and return the process exit code.

    Args:
        argv: the options, as on the command line; None reads `sys.argv[1:]`.

    Returns:
        0 when the run finished, 1 when an analysis or a write failed, 2 when nothing was
        trained (bad option, missing data, unusable `--save-dir`), 3 when the loss diverged,
        4 when the processes of a torchrun launch failed each other, 130 / 143 after SIGINT /
        SIGTERM.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as error:
        parser.error(str(error))

    from rich.console import Console

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        return _run(config, Console(), err)
    except KeyboardInterrupt:  # while loading data: run() handles the signals once it starts
        err.print("[bold yellow]stopped:[/bold yellow] interrupted before training began")
        return 130
    finally:
        _leave_process_group()


def run_and_exit(argv: Sequence[str] | None = None) -> NoReturn:
    """`main(argv)`, then exit with its code (what `runner.py` does).

    Once `main` returns every file is written and closed, but Python's shutdown would still
    spend about 1.4 s (a tenth of a default run) in its final garbage collections, walking the
    millions of objects that torch, `torch._dynamo` (imported by the optimiser), torchvision,
    Captum and openTSNE leave behind. `gc.freeze()` moves them out of the collector's sight
    first: the exit takes 0.2 s, and the `atexit` handlers and stream flushes of a normal exit
    still run (measured on this machine: 1.38-1.54 s without, 0.20-0.21 s with).

    Args:
        argv: the options, as on the command line; None reads `sys.argv[1:]`.
    """
    code = main(argv)
    gc.freeze()
    sys.exit(code)


def _leave_process_group() -> None:
    """Close the torchrun process group `_run` joined (nothing to do without torchrun)."""
    distributed = sys.modules.get("exigo.engine.world")  # not imported: nothing was joined
    if distributed is not None:
        distributed.leave()


# errors of the machine, not of exigo: a message, not a traceback
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EIO,
    errno.EACCES,
    errno.EPERM,
}


def _set_threads(threads: int) -> None:
    """Give torch `threads` intra-op threads; 0: `OMP_NUM_THREADS` if set, else half the CPUs.

    Half the CPUs (at least one) by default: the other half renders the figures
    (`exigo.figures.pool`) and absorbs other processes. OpenMP threads spin-wait for each other at
    every operator, so when the cores are oversubscribed an epoch collapses: on 2 cores, two
    threads train the default CNN 1.6x faster than one when nothing else runs (1.4 s instead
    of 2.3 s per epoch), but 10-30x slower once other processes share the cores (29 s at load
    average 2, 76 s at 7; issue 7). torchrun sets `OMP_NUM_THREADS=1` for the same reason.
    """
    import torch

    from exigo._system import available_cpus

    if threads:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, available_cpus() // 2))


def _run(config: Config, console: Console, err: Console) -> int:
    import torch

    from exigo.analyses import default_analyses
    from exigo.data import DataError, load_mnist
    from exigo.engine.checkpoint import CheckpointError
    from exigo.engine.resume import ResumeError
    from exigo.engine.run_dir import SaveDirError, prepare_save_dir
    from exigo.engine.signals import RunInterrupted
    from exigo.engine.world import DistributedError, World, join, resolve_device
    from exigo.pipeline import RunDiverged, run

    rank = 0

    def fail(message: object, code: int) -> int:
        # a DistributedError names its rank already
        where = f"(rank {rank}) " if rank and not isinstance(message, DistributedError) else ""
        err.print(f"[bold red]error:[/bold red] {where}{message}")
        return code

    _set_threads(config.threads)
    try:
        world = join(config.device, config.dist_timeout) or World(resolve_device(config.device))
        rank = world.rank
        with world.all_or_none("loading the data"):  # rank 0 first: it may download
            if rank == 0:
                prepare_save_dir(config.save_dir)
                train_data, val_data = load_mnist(config.data_dir, download=config.download)
        if rank != 0:
            train_data, val_data = load_mnist(config.data_dir, download=False)
    except (DataError, SaveDirError, ValueError) as error:
        return fail(error, 2)
    except DistributedError as error:
        return fail(error, 4)
    if rank != 0:
        from rich.console import Console

        console = Console(quiet=True)  # rank 0 reports progress and results

    torch.manual_seed(config.seed)
    model = default_model(len(train_data.classes), world.device)
    try:
        result = run(config, model, train_data, val_data, default_analyses(config), console=console)
    except (SaveDirError, ResumeError, CheckpointError) as error:
        return fail(error, 2)
    except RunInterrupted as interrupt:
        if rank == 0:  # every process stops; one says so
            err.print(f"[bold yellow]stopped:[/bold yellow] {interrupt}")
        return interrupt.exit_code
    except RunDiverged as error:
        return fail(f"training diverged: {error}", 3) if rank == 0 else 3
    except DistributedError as error:
        return fail(error, 4)
    except OSError as error:
        if error.errno not in _ENVIRONMENT_ERRNOS:
            raise
        resumable = (config.save_dir / "models" / "last.pt").exists()
        return fail(
            f"{error}. Files written before are intact; fix the cause, then "
            + ("continue with --resume" if resumable else "run again"),
            1,
        )

    if result.history:
        best = result.history[result.best_epoch - 1]
        console.print(
            f"best epoch {result.best_epoch}: eval accuracy {best['eval_accuracy']:.2%}, "
            f"model in {result.save_dir / 'models' / 'best.pt'}; "
            f"tensorboard --logdir {result.save_dir / 'logs'}",
            highlight=False,
            soft_wrap=True,
        )
    if result.failed_analyses:
        return fail(_failure_summary(result.failed_analyses), 1)
    return 0


def default_model(num_classes: int, device: torch.device) -> nn.Module:
    """The CNN `runner.py` trains: `MnistCNN`, on the CPU with channels-last weights.

    oneDNN, which runs torch's CPU convolutions, is faster on NHWC: the default CNN trains an
    epoch in 1.5 s instead of 2.4 s on one core, and evaluates and computes input gradients
    1.3-1.9x faster (README, Benchmarks). The outputs of its convolutions are then NHWC too,
    which `MnistCNN` takes (`nn.Flatten` copies as needed); a model that flattens with
    `.view` would fail on them, so `exigo.pipeline.run` leaves the format of other models
    alone. On a GPU the format stays as it is (unmeasured here). Checkpoints load into a model
    in either format.

    Args:
        num_classes: outputs of the classifier.
        device: where the run trains.

    Returns:
        The model, on the CPU (moved to `device` by `run`).
    """
    import torch

    from exigo.models import MnistCNN

    model = MnistCNN(num_classes=num_classes)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model


def _failure_summary(failures: Sequence[tuple[int, str, str]]) -> str:
    """`analysis NAME failed at epochs 1, 2: FIRST ERROR` for each failing analysis."""
    by_name: dict[str, list[tuple[int, str]]] = {}
    for epoch, name, message in failures:
        by_name.setdefault(name, []).append((epoch, message))
    lines = [
        f"analysis {name} failed at epoch{'s' if len(seen) > 1 else ''} "
        f"{', '.join(str(epoch) for epoch, _ in seen)}: {seen[0][1]}"
        for name, seen in by_name.items()
    ]
    return f"{len(failures)} analysis run(s) failed (figures missing):\n  " + "\n  ".join(lines)


if __name__ == "__main__":
    run_and_exit()

"""Command line of `python runner.py`: a dataset by name, a model, and the default analyses.

Exit codes:

- 0: success.
- 1: the run finished but an analysis failed, or a write failed (disk full, read-only).
- 2: bad options (one training step on copies fails with them), data, model (unknown
  `--model`, `--pretrained` weights that cannot be downloaded, a model that does not fit the
  data), save directory (unwritable, a file, in use by another run, or holding others'
  files) or `--resume` (nothing to resume, different options, damaged checkpoint): checked
  before training, nothing was trained, the previous run is untouched.
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
from typing import TYPE_CHECKING, Any, NoReturn

from exigo._io import STORAGE_ERRNOS
from exigo.config import DATASETS, Config

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from torch import nn

    from exigo.figures.pool import FigurePool

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
            "Train an image classifier (a small CNN on MNIST by default) and watch it learn: "
            "after every epoch exigo writes a confusion matrix, saliency maps and an embedding "
            "projection to --save-dir and TensorBoard, and keeps the best model."
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
        help="auto (cuda, then mps, then cpu), cpu, or a device this torch can use here "
        "(cuda, cuda:1, mps, xpu, ...; others are refused with the list) (default: %(default)s)",
    )
    train.add_argument(
        "--model",
        default=_DEFAULTS.model,
        metavar="NAME",
        help="a torchvision classification architecture (resnet18, mobilenet_v3_small, ...), "
        "its input channels and classes adapted to the data (default: a small CNN for 28x28 "
        "images, the residual SmallResNet up to 64x64, resnet18 above)",
    )
    train.add_argument(
        "--pretrained",
        action="store_true",
        help="start --model from torchvision's weights (downloaded to torch's hub cache; "
        "exit 2 when they cannot be)",
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
        "--dataset",
        choices=DATASETS,
        default=_DEFAULTS.dataset,
        help="what to train on: torchvision's datasets (downloaded into --data-dir if absent) "
        "or imagefolder (--data-dir is a folder of class sub-folders, or of train/ and val/ "
        "folders of them) (default: %(default)s)",
    )
    files.add_argument(
        "--data-dir",
        type=Path,
        default=_DEFAULTS.data_dir,
        help="torchvision root holding the dataset (MNIST/raw/, cifar-10-batches-py/, ...; "
        "downloaded there if absent; offline MNIST: ../shared/mnist), or the image folder "
        "(default: %(default)s)",
    )
    files.add_argument(
        "--val-fraction",
        type=_number,
        default=_DEFAULTS.val_fraction,
        help="imagefolder without val/: share of each class held out, seeded by --seed "
        "(default: %(default)s)",
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
        "--force",
        action="store_true",
        help="with --resume: continue with another --threads than the run's, although the "
        "metrics then differ from an uninterrupted run's",
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
        "--rescore-fraction",
        type=_number,
        default=_DEFAULTS.rescore_fraction,
        metavar="RHO",
        help="the training examples suspected of a label error are re-scored by the "
        "end-of-epoch model, at most this share of the training set (0: rank them by the "
        "training passes alone) (default: %(default)s)",
    )
    analysis.add_argument(
        "--rescore-every-epoch",
        action="store_true",
        help="re-score the suspects and take the held-out votes after every epoch, not only "
        "after the last (the final list is the same)",
    )
    analysis.add_argument(
        "--embedding-layer",
        default=_DEFAULTS.embedding_layer,
        metavar="NAME",
        help="module whose input is the embedding the projection shows (head.3; a wrong "
        "name lists the model's modules) (default: the classifier's input)",
    )
    analysis.add_argument(
        "--analysis-budget",
        type=_number,
        default=_DEFAULTS.analysis_budget,
        metavar="X",
        help="model passes the analyses may make per epoch, as a multiple of the epoch's "
        "training passes; above it their settings are lowered or they run every k epochs, "
        "said once (0: no limit) (default: %(default)s)",
    )
    analysis.add_argument(
        "--no-attribution-checks",
        dest="attribution_checks",
        action="store_false",
        help="skip comparing attribution methods and their sanity checks",
    )
    analysis.add_argument(
        "--sequential",
        action="store_true",
        help="analyse each epoch before the next one trains, not beside it (for debugging and "
        "benchmarks; the results are the same)",
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
        "CPUs, and on --resume the run's own count; more threads are faster only on idle "
        "cores, and far slower on busy ones; the count changes results in the last digits) "
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


def main(argv: Sequence[str] | None = None, *, early_worker: bool = False) -> int:
    """Run the pipeline from the command line and return the process exit code.

    Args:
        argv: the options, as on the command line; None reads `sys.argv[1:]`.
        early_worker: start the figure worker before torch is imported (`run_and_exit`, so
            `runner.py`, does): its imports then overlap this process' start. Otherwise
            `exigo.pipeline.run` starts it, and a call that stops at a bad option or missing
            data starts none.

    Returns:
        0 when the run finished, 1 when an analysis or a write failed, 2 when nothing was
        trained (bad option, missing data, a model that cannot be built or does not fit the
        data, unusable `--save-dir`), 3 when the loss diverged,
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
        return _run(config, Console(), err, early_worker=early_worker)
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
    code = main(argv, early_worker=True)
    gc.freeze()
    sys.exit(code)


def _leave_process_group() -> None:
    """Close the torchrun process group `_run` joined (nothing to do without torchrun)."""
    distributed = sys.modules.get("exigo.engine.world")  # not imported: nothing was joined
    if distributed is not None:
        distributed.leave()


# errors of the machine, not of exigo: a message, not a traceback
_ENVIRONMENT_ERRNOS = STORAGE_ERRNOS | {errno.EACCES, errno.EPERM}


#: What the figure worker `_run` starts imports before its first figure: torch (the figures'
#: data arrive as tensors) and the default analyses' `worker_imports` (tested to match).
WORKER_IMPORTS = ("torch", "openTSNE")


def _run(config: Config, console: Console, err: Console, *, early_worker: bool) -> int:
    pool = _early_figure_pool(config, console) if early_worker else None
    try:
        return _run_with(config, console, err, pool)
    finally:
        if pool is not None:  # `run` closed it, unless it never started
            pool.close()


def _early_figure_pool(config: Config, console: Console) -> FigurePool | None:
    """The figure worker, started before this process imports torch, or None.

    Its imports (torch, matplotlib, openTSNE: about 3 s of CPU) then run on the second CPU
    while this process imports torch and loads the data, instead of while the first epoch
    trains, and its first figure does not wait for them. Only on a machine with two CPUs or
    more, and not on the other processes of a torchrun job (rank 0 draws every figure).
    """
    from exigo.figures.pool import FigurePool, figure_workers

    if not figure_workers(is_main=os.environ.get("RANK", "0") == "0"):
        return None  # run() says why the figures are drawn in the run's process
    # no projection, no t-SNE: openTSNE (and scikit-learn, 1 s) need not be imported
    preload = [m for m in WORKER_IMPORTS if m != "openTSNE" or config.projection_limit]
    pool = FigurePool(workers=1, preload=preload, log=console.print)
    pool.start()
    return pool


def _run_with(config: Config, console: Console, err: Console, pool: FigurePool | None) -> int:
    import torch

    from exigo.analyses import default_analyses
    from exigo.data import DataError, load_dataset
    from exigo.engine.checkpoint import CheckpointError
    from exigo.engine.devices import resolve_device, set_threads
    from exigo.engine.preflight import PreflightError
    from exigo.engine.resume import ResumeError
    from exigo.engine.run_dir import SaveDirError, check_replaceable, check_save_dir
    from exigo.engine.signals import RunInterrupted
    from exigo.engine.world import DistributedError, World, join
    from exigo.models import ModelError, check_model_name, torchvision_model
    from exigo.pipeline import RunDiverged, run

    rank = 0

    def fail(message: object, code: int) -> int:
        # a DistributedError names its rank already
        where = f"(rank {rank}) " if rank and not isinstance(message, DistributedError) else ""
        err.print(f"[bold red]error:[/bold red] {where}{message}")
        return code

    set_threads(config.threads)  # loading the data is faster with them too
    try:
        world = join(config.device, config.dist_timeout) or World(resolve_device(config.device))
        rank = world.rank
        if config.model is not None:  # an unknown name costs no download
            check_model_name(config.model)

        def load(download: bool) -> tuple[Any, Any]:
            return load_dataset(
                config.dataset,
                config.data_dir,
                download=download,
                val_fraction=config.val_fraction,
                seed=config.seed,
                log=console.print if rank == 0 else lambda _line: None,
            )

        with world.all_or_none("loading the data"):  # rank 0 first: it may download
            if rank == 0:  # before the data: a wrong --save-dir costs no download
                check_save_dir(config.save_dir)
                if not config.resume:
                    check_replaceable(config.save_dir, config.data_dir)
                train_data, val_data = load(config.download)
        if rank != 0:
            train_data, val_data = load(False)
        image_shape = tuple(train_data[0][0].shape)
        torch.manual_seed(config.seed)
        if config.model is None:
            model = default_model(len(train_data.classes), world.device, image_shape)
        else:
            model = torchvision_model(
                config.model,
                image_shape[0],
                len(train_data.classes),
                pretrained=config.pretrained,
            )
    except (DataError, SaveDirError, ModelError, ValueError) as error:
        return fail(error, 2)
    except DistributedError as error:
        return fail(error, 4)
    if rank != 0:
        from rich.console import Console

        console = Console(quiet=True)  # rank 0 reports progress and results

    try:
        result = run(
            config,
            model,
            train_data,
            val_data,
            default_analyses(config),
            console=console,
            figure_pool=pool,
        )
    except (SaveDirError, ResumeError, CheckpointError, PreflightError, ModelError) as error:
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
        return fail(_write_failure(error, config), 1)

    if result.failed_analyses:  # run() printed the closing line
        return fail(_failure_summary(result.failed_analyses), 1)
    return 0


def _write_failure(error: OSError, config: Config) -> str:
    """One sentence: the file, the reason, the free space, and what is kept."""
    from exigo._io import describe_write_error

    notes = getattr(error, "__notes__", [])  # the previous run, put back (run_dir)
    if notes:
        kept = "; ".join(notes)
    elif (config.save_dir / "models" / "last.pt").exists():
        kept = "files written before are whole; fix the cause, then continue with --resume"
    else:
        kept = "files written before are whole; fix the cause, then run again"
    return f"{describe_write_error(error, config.save_dir)}; {kept}"


def default_model(
    num_classes: int, device: torch.device, image_shape: Sequence[int] = (1, 28, 28)
) -> nn.Module:
    """The model `runner.py` trains without `--model`, on the CPU with channels-last weights.

    `exigo.models.default_model` chooses it by input shape: `MnistCNN` for 28x28 images,
    `SmallResNet` up to 64x64, torchvision's `resnet18` above. oneDNN, which runs torch's
    CPU convolutions, is faster on NHWC: the MNIST CNN trains an epoch in 1.5 s instead of
    2.4 s on one core, and evaluates and computes input gradients 1.3-1.9x faster (README,
    Benchmarks). The outputs of its convolutions are then NHWC too, which these models take
    (`nn.Flatten` and `torch.flatten` copy as needed); a model that flattens with `.view`
    would fail on them, so `exigo.pipeline.run` leaves the format of other models alone. On
    a GPU the format stays as it is (unmeasured here). Checkpoints load into a model in
    either format.

    Args:
        num_classes: outputs of the classifier.
        device: where the run trains.
        image_shape: `(C, H, W)` of the data's images.

    Returns:
        The model, on the CPU (moved to `device` by `run`).
    """
    import torch

    from exigo.models import default_model as model_for_shape

    model = model_for_shape(image_shape, num_classes)
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

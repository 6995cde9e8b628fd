"""`python runner.py` without its analyses: training, evaluation and checkpoints only (issue 22).

    python bench/training_only.py --data-dir ../shared/mnist --save-dir save/training-only \
        [runner options]

The options, data, seed, model and torch threads of `runner.py`, through the public API only:
`exigo.pipeline.run(config, default_model(...), train, held_out, analyses=[])`. The run still
writes metrics.json, the TensorBoard scalars, report.html and both checkpoints. `bench/
pipeline.py` runs it as a subprocess, interleaved with `runner.py`, as the baseline that the
whole run is compared with.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/training_only.py` from a checkout

if TYPE_CHECKING:
    from exigo.config import Config


def parse_runner_options(argv: Sequence[str]) -> Config:
    """The `Config` that `python runner.py ARGV` would run (its parser, its validation).

    Args:
        argv: runner.py's options.

    Returns:
        The run's configuration.
    """
    from exigo.cli import build_parser, config_from_args

    parser = build_parser()
    args = parser.parse_args(list(argv))
    try:
        return config_from_args(args)
    except ValueError as error:
        parser.error(str(error))


def set_threads(config: Config) -> int:
    """Give torch the intra-op threads `runner.py` gives it; return how many.

    `runner.py`'s rule (`--threads`, else `OMP_NUM_THREADS` when set, else half the CPUs this
    process may use), repeated here because the CLI applies it in a private function and
    `exigo.pipeline.run` leaves torch's threads alone.

    Args:
        config: the run's settings (`threads`).

    Returns:
        `torch.get_num_threads()` afterwards.
    """
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS
            cpus = os.cpu_count() or 1
        torch.set_num_threads(max(1, cpus // 2))
    return torch.get_num_threads()


def main(argv: Sequence[str]) -> int:
    """Train as `runner.py` does, with no analysis.

    Args:
        argv: runner.py's options.

    Returns:
        The exit code: 0, or 1 when something the run records as failed (the report) failed.
    """
    import torch

    from exigo.cli import default_model
    from exigo.data import load_mnist
    from exigo.engine.devices import resolve_device
    from exigo.pipeline import run

    config = parse_runner_options(argv)
    set_threads(config)
    train_data, held_out = load_mnist(config.data_dir, download=config.download)
    torch.manual_seed(config.seed)  # the same initial weights as runner.py's model
    model = default_model(len(train_data.classes), resolve_device(config.device))
    result = run(config, model, train_data, held_out, analyses=[])
    return 1 if result.failed_analyses else 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    gc.freeze()  # leave as fast as runner.py does (`exigo.cli.run_and_exit`)
    sys.exit(code)

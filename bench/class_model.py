"""Time of `exigo.analyses.class_models.class_models`, ten MNIST classes (budget: 1 s an epoch).

Default `MnistCNN` with random weights (the time does not depend on the weights) and the
default settings (60 steps). Prints every repetition, then the medians of the wall-clock and
CPU time: on a shared machine the wall-clock time grows with the load, the CPU time much less
(the ascent runs on one intra-op thread).

    python bench/class_model.py [--repeats 7] [--steps 60]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from exigo.analyses.class_models import class_models
from exigo.data import MNIST_NORMALIZATION
from exigo.models import MnistCNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs (%(default)s)")
    parser.add_argument("--steps", type=int, default=60, help="ascent steps (%(default)s)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = MnistCNN().eval()
    blank = MNIST_NORMALIZATION.blank((1, 1, 28, 28))
    classes = torch.arange(10)
    class_models(model, blank, classes, normalization=MNIST_NORMALIZATION, steps=5)  # warm-up

    walls, cpus = [], []
    for repeat in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        class_models(model, blank, classes, normalization=MNIST_NORMALIZATION, steps=args.steps)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
        print(f"run {repeat + 1}: {walls[-1]:.3f} s wall, {cpus[-1]:.3f} s CPU")
    print(
        f"median {statistics.median(walls):.3f} s wall, {statistics.median(cpus):.3f} s CPU "
        f"for 10 classes x {args.steps} steps over {args.repeats} runs "
        f"(torch {torch.__version__})"
    )


if __name__ == "__main__":
    main()

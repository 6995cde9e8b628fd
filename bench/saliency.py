"""Throughput of `exigo.analyses.saliency.saliency_maps`: images per second for the five maps.

Default `MnistCNN` (untrained: the speed does not depend on the weights), the 2,000 held-out
images of `../shared/mnist`, chunks of 256. Prints every repetition and the median.

    python bench/saliency.py [--data-dir ../shared/mnist] [--repeats 7] [--chunk-size 256]
                             [--threads N]

`--threads 1` gives the least load-sensitive figure on a busy machine: one thread's rate per
CPU-second is a lower bound for what one idle core does.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from exigo.analyses.saliency import DEFAULT_CHUNK_SIZE, saliency_maps
from exigo.data import load_mnist
from exigo.models import MnistCNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/mnist", help="%(default)s")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs (%(default)s)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="%(default)s")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    _, held_out = load_mnist(args.data_dir, download=False)
    images, labels = held_out.images, held_out.targets  # (2000, 1, 28, 28), (2000,)
    torch.manual_seed(0)
    model = MnistCNN().eval()
    saliency_maps(model, images[:256], labels[:256], normalization=held_out.normalization)

    rates, cpu_rates = [], []
    threads = torch.get_num_threads()
    for repeat in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        saliency_maps(
            model,
            images,
            labels,
            normalization=held_out.normalization,
            chunk_size=args.chunk_size,
        )
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        rates.append(images.shape[0] / seconds)
        cpu_rates.append(images.shape[0] * threads / cpu_seconds)
        print(
            f"run {repeat + 1}: {seconds:.3f} s wall, {rates[-1]:,.0f} img/s; "
            f"{cpu_seconds:.3f} CPU-s, {cpu_rates[-1]:,.0f} img/s per {threads} busy cores"
        )
    print(
        f"median {statistics.median(rates):,.0f} img/s wall, "
        f"{statistics.median(cpu_rates):,.0f} img/s from CPU time, over {args.repeats} runs "
        f"({images.shape[0]} images, chunk {args.chunk_size}, {threads} threads, "
        f"torch {torch.__version__})"
    )


if __name__ == "__main__":
    main()

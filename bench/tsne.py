"""Benchmark exigo's t-SNE step (openTSNE) on real MNIST embeddings, and its warm start.

    python bench/tsne.py --data-dir ../shared/mnist [--repeats 3] [--points 2000] [--only theta]

1. Trains the default CNN for 2 epochs once (the embeddings are cached in --cache) and keeps
   the held-out embeddings [2000, 128] after epochs 1 and 2.
2. speed: milliseconds per iteration for Barnes-Hut vs FFT gradients with 1 and 2 threads
   (interleaved rounds), exact vs Annoy neighbours, and the default step of epochs 1 and 2.
3. iterations: quality of the first epoch's layout for shorter schedules.
4. theta: the Barnes-Hut angle of both epochs' default steps (CPU seconds, interleaved rounds,
   and the quality measures below).
5. warm: epoch 2 started from epoch 1's layout, with and without early exaggeration and for
   fewer iterations, against a fresh PCA start. Quality: KL divergence, the fraction of each
   point's 10 nearest neighbours in the embedding that stay among its 10 nearest in the layout,
   and the accuracy of a 10-nearest-neighbour vote on the true labels in the layout. Stability:
   the median distance a point moves between the epoch-1 and epoch-2 pictures, as a fraction
   of the epoch-1 layout's RMS radius (no alignment: the reader sees raw pictures).

Times are medians of --repeats runs; other processes share the CPU, so they are noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from exigo.analyses.projection import stratified_indices, tsne_layout


def embeddings_after_epochs(data_dir: Path, cache: Path) -> dict[str, torch.Tensor]:
    if cache.exists():
        return torch.load(cache, weights_only=True)
    from rich.console import Console

    from exigo.analysis import Analysis
    from exigo.config import Config
    from exigo.data import load_mnist
    from exigo.models import MnistCNN
    from exigo.pipeline import run

    kept: dict[str, torch.Tensor] = {}

    class Keep(Analysis):
        name = "keep"

        def __call__(self, ctx):
            kept[f"epoch{ctx.epoch}"] = ctx.eval.embeddings.clone()
            kept["targets"] = ctx.eval.targets.clone()
            kept[f"predictions{ctx.epoch}"] = ctx.eval.predictions.clone()

    train, held_out = load_mnist(data_dir, download=False)
    config = Config(data_dir=data_dir, save_dir=Path("/tmp/exigo-bench-tsne-run"), run_name="b")
    torch.manual_seed(config.seed)
    run(config, MnistCNN(), train, held_out, [Keep()], console=Console(quiet=True))
    torch.save(kept, cache)
    return kept


def timed(repeats: int, **kwargs) -> tuple[float, list[float], torch.Tensor]:
    times, layout = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        layout = tsne_layout(**kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, layout


def knn(points: np.ndarray, k: int) -> np.ndarray:
    squared = (points**2).sum(1)
    distances = squared[:, None] + squared[None, :] - 2 * points @ points.T
    np.fill_diagonal(distances, np.inf)
    return np.argsort(distances, axis=1)[:, :k]


def quality(
    embeddings: torch.Tensor, layout: torch.Tensor, labels: torch.Tensor, k: int = 10
) -> tuple[float, float]:
    high = knn(embeddings.double().numpy(), k)
    low = knn(layout.double().numpy(), k)
    kept = np.mean([len(set(h) & set(lo)) / k for h, lo in zip(high, low, strict=True)])
    votes = labels.numpy()[low]
    majority = np.array([np.bincount(row, minlength=10).argmax() for row in votes])
    return float(kept), float((majority == labels.numpy()).mean())


def kl_divergence(embeddings: torch.Tensor, layout: torch.Tensor, perplexity: float) -> float:
    """Exact KL(P || Q) of a layout, P from openTSNE's affinities (sparse, sums to 1)."""
    from openTSNE import affinity

    affinities = affinity.PerplexityBasedNN(
        embeddings.double().numpy(), perplexity=perplexity, method="exact"
    )
    P = affinities.P.tocoo()
    points = layout.double().numpy()
    squared = (points**2).sum(1)
    kernel = 1 / (1 + squared[:, None] + squared[None, :] - 2 * points @ points.T)
    np.fill_diagonal(kernel, 0)
    q = kernel[P.row, P.col] / kernel.sum()
    p = P.data / P.data.sum()
    return float(np.sum(p * np.log(p / q)))


def moved(previous: torch.Tensor, current: torch.Tensor) -> float:
    radius = previous.sub(previous.mean(0)).pow(2).sum(1).mean().sqrt()
    return float((current - previous).norm(dim=1).median() / radius)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/mnist"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/exigo-bench-tsne.pt"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--only", choices=["speed", "iterations", "theta", "warm"], default=None)
    args = parser.parse_args()

    kept = embeddings_after_epochs(args.data_dir, args.cache)
    chosen = stratified_indices(kept["targets"], args.points, seed=0)
    first, second = kept["epoch1"][chosen], kept["epoch2"][chosen]
    labels = kept["targets"][chosen]
    print(f"{len(chosen)} points, {first.shape[1]} dimensions, {os.cpu_count()} CPUs (shared)\n")

    if args.only in (None, "speed"):
        print("## speed per iteration (PCA start, 100 exaggerated + 150 plain iterations)\n")
        print("Runs interleaved (one of each setting per round), so load changes hit all alike.\n")
        grid = [("bh", 1), ("bh", 2), ("fft", 1), ("fft", 2)]
        per_iteration: dict[tuple[str, int], list[float]] = {key: [] for key in grid}
        loads = []
        for _ in range(args.repeats):
            for method, jobs in grid:
                start = time.perf_counter()
                tsne_layout(
                    first,
                    negative_gradient_method=method,
                    n_jobs=jobs,
                    early_exaggeration_iter=100,
                    n_iter=150,
                )
                per_iteration[(method, jobs)].append((time.perf_counter() - start) / 250 * 1e3)
            loads.append(os.getloadavg()[0])
        print("| gradient | threads | median ms / iteration | runs |")
        print("| --- | --- | --- | --- |")
        for (method, jobs), values in per_iteration.items():
            runs = ", ".join(f"{v:.1f}" for v in values)
            print(f"| {method} | {jobs} | {statistics.median(values):.1f} | {runs} |")
        print(f"\n1-minute load average during the rounds: {', '.join(f'{x:.1f}' for x in loads)}")

        print("\n## neighbours and affinities (perplexity 30)\n")
        from openTSNE import affinity

        data = first.double().numpy()
        for method in ("exact", "annoy"):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                affinity.PerplexityBasedNN(data, perplexity=30, method=method, random_state=0)
                times.append(time.perf_counter() - start)
            print(f"- {method}: median {statistics.median(times):.2f} s")

        print("\n## the default step (what each epoch costs)\n")
        print("| epoch | median s | runs s |")
        print("| --- | --- | --- |")
        median, times, start_layout = timed(args.repeats, embeddings=first)
        print(f"| 1 (PCA start) | {median:.2f} | {', '.join(f'{t:.2f}' for t in times)} |")
        median, times, _ = timed(args.repeats, embeddings=second, initialization=start_layout)
        print(f"| 2 (from epoch 1) | {median:.2f} | {', '.join(f'{t:.2f}' for t in times)} |")
        print(f"\n1-minute load average now: {os.getloadavg()[0]:.1f}")

    if args.only in (None, "iterations"):
        print("\n## first epoch: how many iterations (PCA start)\n")
        print("| exaggerated iters | n_iter | median s | KL | kNN kept | kNN label acc |")
        print("| --- | --- | --- | --- | --- | --- |")
        for exaggerated, n_iter in [(250, 500), (250, 250), (125, 250), (100, 150), (75, 125)]:
            median, _, layout = timed(
                args.repeats,
                embeddings=first,
                early_exaggeration_iter=exaggerated,
                n_iter=n_iter,
            )
            kept_fraction, label_accuracy = quality(first, layout, labels)
            kl = kl_divergence(first, layout, 30.0)
            print(
                f"| {exaggerated} | {n_iter} | {median:.2f} | {kl:.3f} | {kept_fraction:.3f} | "
                f"{label_accuracy:.3f} |"
            )

    if args.only in (None, "theta"):
        print("\n## the Barnes-Hut angle theta (both epochs' default steps, one thread)\n")
        print(
            "Rounds interleaved, the order rotated each round, after one untimed call that "
            "imports openTSNE; CPU seconds of this process, medians of --repeats.\n"
        )
        thetas = (0.5, 0.65, 0.8, 1.0)
        cpu: dict[float, list[tuple[float, float]]] = {theta: [] for theta in thetas}
        layouts: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        tsne_layout(first, seed=0, n_jobs=1, n_iter=0, early_exaggeration_iter=0)  # imports
        for round_ in range(args.repeats):
            shift = round_ % len(thetas)  # each angle goes first in some round
            for theta in thetas[shift:] + thetas[:shift]:
                started = time.process_time()
                one = tsne_layout(first, seed=0, theta=theta, n_jobs=1)
                middle = time.process_time()
                two = tsne_layout(second, one, seed=0, theta=theta, n_jobs=1)
                cpu[theta].append((middle - started, time.process_time() - middle))
                layouts[theta] = (one, two)
        print(
            "| theta | epoch 1 CPU s | epoch 2 CPU s | kNN kept 1 / 2 | kNN label acc 1 / 2 | "
            "KL 1 / 2 | moved / radius |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for theta in thetas:
            one, two = layouts[theta]
            kept_1, accuracy_1 = quality(first, one, labels)
            kept_2, accuracy_2 = quality(second, two, labels)
            print(
                f"| {theta} | {statistics.median(c[0] for c in cpu[theta]):.2f} | "
                f"{statistics.median(c[1] for c in cpu[theta]):.2f} | "
                f"{kept_1:.3f} / {kept_2:.3f} | {accuracy_1:.3f} / {accuracy_2:.3f} | "
                f"{kl_divergence(first, one, 30.0):.3f} / {kl_divergence(second, two, 30.0):.3f} | "
                f"{moved(one, two):.3f} |"
            )

    if args.only in (None, "warm"):
        print("\n## epoch 2: where to start, how long to run\n")
        start = tsne_layout(first, seed=0)  # the default first epoch
        print(
            "| epoch 2 start | exaggerated iters | n_iter | learning rate / K | median s | KL | "
            "kNN kept | kNN label acc | moved / radius |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        rescaled = start / start[:, 0].std() * 1e-4
        points = second.shape[0]
        cases = [  # the learning rate of the plain iterations, in units of K (openTSNE's)
            ("PCA (fresh)", None, 250, 500, 1),
            ("previous, rescaled to std 1e-4", rescaled, 250, 500, 1),
            ("previous layout", start, 250, 500, 1),
            ("previous layout", start, 125, 250, 1),
            ("previous layout", start, 0, 500, 1),
            ("previous layout", start, 0, 250, 1),
            ("previous layout (earlier default)", start, 0, 150, 1),
            ("previous layout", start, 0, 100, 1),
            ("previous layout (default)", start, 0, 100, 2),
            ("previous layout", start, 0, 100, 3),
            ("previous layout", start, 0, 150, 2),
            ("previous layout", start, 0, 75, 3),
        ]
        for description, init, exaggerated, n_iter, rate in cases:
            median, _, layout = timed(
                args.repeats,
                embeddings=second,
                initialization=init,
                early_exaggeration_iter=exaggerated,
                n_iter=n_iter,
                learning_rate=rate * points,
            )
            kept_fraction, label_accuracy = quality(second, layout, labels)
            kl = kl_divergence(second, layout, 30.0)
            print(
                f"| {description} | {exaggerated} | {n_iter} | {rate} | {median:.2f} | {kl:.3f} | "
                f"{kept_fraction:.3f} | {label_accuracy:.3f} | {moved(start, layout):.3f} |"
            )
        kept_fraction, label_accuracy = quality(second, start, labels)
        kl = kl_divergence(second, start, 30.0)
        print(
            f"| epoch 1's layout unchanged | - | 0 | - | 0 | {kl:.3f} | {kept_fraction:.3f} | "
            f"{label_accuracy:.3f} | 0 |"
        )


if __name__ == "__main__":
    main()

"""What the attribution checks cost, part by part, and what cheaper settings would lose.

    python bench/attributions.py --data-dir ../shared/mnist [--repeats 3] [--skip-runs]

1. Share of the run: the default 2-epoch MNIST run with no analysis, and with only
   `AttributionAnalysis` (defaults), alternating, --repeats times each. Reports the median
   run time of each, the attribution analysis' seconds per epoch by part (maps, faithfulness,
   sanity, figures) and its share of the run's time.
2. Settings, on the trained model of the last run and the 10 probe images: seconds per call
   of each method at a few costs, with a quality figure for each:
   - Integrated Gradients: completeness error |sum(a) - (f(x) - f(x'))| / |f(x) - f(x')|;
   - SmoothGrad: Spearman of |map| with a 64-sample map (how converged the average is);
   - Occlusion: deletion AUC of its maps (lower is better);
   - deletion/insertion steps: the AUCs at k steps against k = 28;
   - randomisation: seconds with and without the independent variant.

Times are medians; other processes share the 2 CPU cores, so they are noisy. Under load,
`--threads 1` and the CPU-time lines are the better guide: CPU seconds of one thread do not
count the time spent waiting for a core.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch


def median_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def share_of_run(data_dir: Path, repeats: int) -> torch.nn.Module:
    from rich.console import Console

    from exigo.analyses.attributions import AttributionAnalysis
    from exigo.config import Config
    from exigo.data import load_mnist
    from exigo.models import MnistCNN
    from exigo.pipeline import run

    train, held_out = load_mnist(data_dir, download=False)
    quiet = Console(file=open("/dev/null", "w"))  # noqa: SIM115
    totals: dict[str, list[float]] = {"without": [], "with": []}
    cpu_totals: dict[str, list[float]] = {"without": [], "with": []}
    analysis_cpu: list[float] = []
    parts: dict[str, list[float]] = {}
    model = None

    class Timed(AttributionAnalysis):
        def __call__(self, ctx):
            start = time.process_time()
            super().__call__(ctx)
            analysis_cpu.append(time.process_time() - start)

    for repeat in range(repeats):
        for variant in ("without", "with") if repeat % 2 == 0 else ("with", "without"):
            torch.manual_seed(0)
            model = MnistCNN()
            analyses = [Timed(seed=0)] if variant == "with" else []
            with tempfile.TemporaryDirectory() as save_dir:
                config = Config(save_dir=Path(save_dir), data_dir=data_dir, download=False)
                start, cpu_start = time.perf_counter(), time.process_time()
                result = run(config, model, train, held_out, analyses, console=quiet)
                totals[variant].append(time.perf_counter() - start)
                cpu_totals[variant].append(time.process_time() - cpu_start)
            for row in result.history:
                for key, value in row.items():
                    if key.startswith("attributions/seconds/"):
                        parts.setdefault(key.rsplit("/", 1)[1], []).append(value)
                if variant == "with":
                    parts.setdefault("whole analysis", []).append(
                        row["analysis_seconds"]["attributions"]
                    )
    without, with_ = statistics.median(totals["without"]), statistics.median(totals["with"])
    print(f"run without analyses: {without:.1f} s  (runs: {fmt(totals['without'])})")
    print(f"run with attributions: {with_:.1f} s  (runs: {fmt(totals['with'])})")
    for part, values in parts.items():
        print(f"  {part:<15} {statistics.median(values):.2f} s per epoch  ({fmt(values)})")
    analysis = sum(parts["whole analysis"]) / repeats  # per run, both epochs
    print(
        f"wall: attributions {analysis:.1f} s of a {with_:.1f} s run = {analysis / with_:.0%} "
        f"(run time grew by {(with_ - without) / without:.0%})"
    )
    cpu_with = statistics.median(cpu_totals["with"])
    cpu_without = statistics.median(cpu_totals["without"])
    cpu_analysis = sum(analysis_cpu) / repeats
    print(
        f"CPU time: run without {cpu_without:.1f} s, with {cpu_with:.1f} s; attributions "
        f"{cpu_analysis:.1f} s per run ({fmt(analysis_cpu)} per epoch) = "
        f"{cpu_analysis / cpu_with:.0%} of the run's CPU time"
    )
    assert model is not None
    return model.eval()


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def settings_sweep(model: torch.nn.Module, data_dir: Path, repeats: int) -> None:
    from exigo.analyses import attributions as A
    from exigo.analyses.faithfulness import deletion_insertion
    from exigo.analyses.sanity import randomisation_checks, spearman
    from exigo.analysis import select_probe
    from exigo.data import MNIST_NORMALIZATION, blank_image, load_mnist

    _, held_out = load_mnist(data_dir, download=False)
    index = select_probe(held_out.targets, 10, 10)
    images, targets = held_out.images[index], held_out.targets[index]
    baseline = blank_image(MNIST_NORMALIZATION, images)
    with torch.no_grad():
        gap = (model(images) - model(baseline.expand_as(images)))[torch.arange(10), targets]

    print("\nIntegrated Gradients (steps: seconds, completeness error median / max)")
    for steps in (8, 16, 32):
        call = functools.partial(
            A.integrated_gradients, model, images, targets, baseline=baseline, steps=steps
        )
        error = (call().sum(dim=(1, 2, 3)) - gap).abs() / gap.abs()
        print(
            f"  {steps:>3}: {median_seconds(call, repeats):.3f} s, "
            f"{error.median():.1%} / {error.max():.1%}"
        )

    print("\nSmoothGrad (samples: seconds, Spearman of |map| with 64 samples)")
    value_range = float(images.max() - images.min())
    reference = A.smoothgrad(model, images, targets, samples=64, value_range=value_range)
    for samples in (8, 16, 32):
        call = functools.partial(
            A.smoothgrad, model, images, targets, samples=samples, value_range=value_range
        )
        rho = spearman(call().sum(1), reference.sum(1)).mean()
        print(f"  {samples:>3}: {median_seconds(call, repeats):.3f} s, {rho:.2f}")

    print("\nOcclusion (window/stride: seconds, deletion AUC / insertion AUC)")
    for window, stride in ((4, 4), (7, 7), (7, 3), (5, 2)):
        call = functools.partial(
            A.occlusion, model, images, targets, baseline=baseline, window=window, stride=stride
        )
        curves = deletion_insertion(
            model, images, targets, call().sum(1)[None], baseline, names=["occlusion"]
        )
        print(
            f"  {window}/{stride}: {median_seconds(call, repeats):.3f} s, "
            f"{float(curves.deletion_auc[0]):.3f} / {float(curves.insertion_auc[0]):.3f}"
        )

    methods = A.default_methods(baseline, value_range=value_range)
    explain = functools.partial(A.attribution_maps, methods=methods)
    maps = explain(model, images, targets)
    print(
        f"\nall six maps: {median_seconds(lambda: explain(model, images, targets), repeats):.3f} s"
    )
    print("\ndeletion/insertion steps (k: seconds, max |AUC - AUC at k=28| over the orders)")
    fine = deletion_insertion(model, images, targets, maps, baseline, names=list(methods), steps=28)
    for steps in (5, 10, 20):
        call = functools.partial(
            deletion_insertion,
            model,
            images,
            targets,
            maps,
            baseline,
            names=list(methods),
            steps=steps,
        )
        curves = call()
        error = max(
            float((curves.deletion_auc - fine.deletion_auc)[:-1].abs().max()),
            float((curves.insertion_auc - fine.insertion_auc)[:-1].abs().max()),
        )
        print(f"  {steps:>3}: {median_seconds(call, repeats):.3f} s, {error:.3f}")

    print("\nrandomisation, every depth and the seed control (independent too: seconds)")
    for independent in (False, True):
        call = functools.partial(
            randomisation_checks,
            model,
            images,
            targets,
            explain,
            maps,
            names=list(methods),
            independent=independent,
        )
        print(f"  {independent}: {median_seconds(call, repeats):.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/mnist"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-runs", action="store_true", help="only the settings sweep")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.skip_runs:
        from exigo.models import MnistCNN

        torch.manual_seed(0)
        model = MnistCNN().eval()
        print("(untrained model: --skip-runs)")
    else:
        model = share_of_run(args.data_dir, args.repeats)
    settings_sweep(model, args.data_dir, args.repeats)


if __name__ == "__main__":
    main()

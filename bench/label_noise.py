"""Planted label noise: how well does each method find it, and at what cost (issue 18).

    python bench/label_noise.py --data-dir ../shared/mnist [--noise 0.02 0.05 0.10]
        [--repeats 3] [--flip-seed 0] [--rescore-fraction 0.2] [--json save/label_noise.json]

For each noise level, a seeded fraction of the training labels is flipped, each to another
class chosen uniformly; the held-out set stays clean. Three methods then rank the training
examples, most suspicious first, and the flipped ones are counted in the top k (k = number
flipped, so precision@k = recall@k):

- **exigo**: `exigo.pipeline.run` with `ExampleAnalysis` as its only analysis (`runner.py`'s
  defaults: model, seed, epochs, threads); the ranking is `examples.csv`'s `rank` (training
  dynamics recorded by the training passes, the suspects re-scored by the final model and
  ordered with the held-out set's votes; `--rescore-fraction 0` ranks by the training
  records alone). Its own suspects
  (`label_issues.csv`) are scored as a set too.
- **final loss**: the same run without any analysis, then one pass of the final model over the
  training set; ranked by each example's cross-entropy, highest first.
- **cleanlab**: 5-fold cross-validation (scikit-learn's `StratifiedKFold`, seeded): 5 runs of
  the same model, settings and epochs on 4/5 of the noisy training set, each predicting the
  fifth it did not see; `cleanlab.filter.find_label_issues` on those out-of-sample
  probabilities (its defaults: prune by noise rate, issues ranked by self-confidence), the
  examples it does not flag following by self-confidence (`get_label_quality_scores`). Its
  own flagged set is scored too.

Times are wall seconds and this process' CPU seconds of everything each method needs, training
included; the exigo and plain runs alternate `--repeats` times and the medians are reported,
with the run's own phase timings (`RunResult.timings`), so their difference is the extra cost
of exigo's ranking (the record, the analysis, and the wait for its two figures per epoch). The
figure worker's CPU is measured apart, by drawing the two figures here. A separate measurement
trains one epoch with and without the per-example record (`train_epoch(record_examples=...)`),
alternating, to isolate the recording's share of the training time.

Needs cleanlab (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/label_noise.py` from a checkout
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from training_only import parse_runner_options, set_threads  # noqa: E402

from exigo.analyses.examples import ExampleAnalysis  # noqa: E402
from exigo.cli import default_model  # noqa: E402
from exigo.config import Config  # noqa: E402
from exigo.data import TensorImageDataset, load_mnist  # noqa: E402
from exigo.engine.devices import resolve_device  # noqa: E402
from exigo.engine.training import TrainingDynamics, evaluate, train_epoch  # noqa: E402
from exigo.pipeline import run  # noqa: E402

FOLDS = 5


def flip_labels(
    targets: torch.Tensor, fraction: float, classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip a seeded `fraction` of `targets`, each to another class chosen uniformly.

    Returns:
        `(labels, flipped)`: the noisy labels [N] and the flipped positions [k].
    """
    generator = torch.Generator().manual_seed(seed)
    count = round(fraction * targets.numel())
    flipped = torch.randperm(targets.numel(), generator=generator)[:count]
    labels = targets.clone()
    offsets = torch.randint(1, classes, (count,), generator=generator)
    labels[flipped] = (labels[flipped] + offsets) % classes
    return labels, flipped


def scores(ranking: np.ndarray, flagged: np.ndarray | None, flipped: set[int]) -> dict[str, Any]:
    """Precision@k (= recall@k, k = |flipped|) of a ranking; precision and recall of a set."""
    k = len(flipped)
    found = len(set(ranking[:k].tolist()) & flipped)
    out: dict[str, Any] = {"precision_at_k": found / k, "recall_at_k": found / k, "k": k}
    if flagged is not None:
        hits = len(set(flagged.tolist()) & flipped)
        out |= {
            "flagged": int(flagged.size),
            "flagged_precision": hits / max(flagged.size, 1),
            "flagged_recall": hits / k,
        }
    return out


def timed(work: Any) -> tuple[Any, float, float]:
    """`work()`, its wall seconds and this process' CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def figure_cost(train: Any, repeats: int = 3) -> dict[str, float]:
    """CPU seconds to draw and encode the analysis' two figures, as its figure worker does.

    A data map of the whole training set and a label-issues figure of 2 x 8 suspects, with
    made-up values (the cost depends on the counts only), drawn here; the median of `repeats`
    after one warm-up.
    """
    from exigo.analyses.errors import ErrorSaliency
    from exigo.analyses.examples import Suspects, plot_data_map, plot_suspects

    count, generator = len(train), torch.Generator().manual_seed(0)
    values = torch.rand(4, count, generator=generator)
    eight = torch.arange(8)
    blocks = [Suspects(split, 100, eight, eight % 10, (eight + 1) % 10, values[0, :8],
                       values[1, :8]) for split in ("train", "held_out")]  # fmt: skip
    saliency = ErrorSaliency(torch.randn(16, 28, 28), torch.randn(16, 28, 28))
    seconds: dict[str, list[float]] = {"data_map": [], "label_issues": []}
    for repeat in range(repeats + 1):
        for name in seconds:
            started = time.process_time()
            if name == "data_map":
                figure = plot_data_map(
                    values[0], values[1] / 2, values[2], values[3] < 0.05, title="map", epochs=2
                )
            else:
                figure = plot_suspects(
                    blocks, torch.rand(16, 1, 28, 28), saliency, train.classes, title="suspects"
                )
            figure.savefig(io.BytesIO(), format="png", dpi=100)
            if repeat:
                seconds[name].append(time.process_time() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}


def pipeline_run(
    config: Config, train: Any, held_out: Any, analyses: list, save_dir: Path
) -> tuple[Any, Any]:
    """`runner.py`'s model and seed through `exigo.pipeline.run`; (model, result)."""
    torch.manual_seed(config.seed)
    model = default_model(len(held_out.classes), resolve_device(config.device))
    quiet = Console(file=io.StringIO())
    settings = config.to_dict() | {"save_dir": save_dir, "run_name": "bench"}
    result = run(Config(**settings), model, train, held_out, analyses, console=quiet)
    if result.failed_analyses:
        raise SystemExit(f"the run recorded failures: {result.failed_analyses}")
    return model, result


def exigo_ranking(
    config: Config, noisy: Any, held_out: Any, save_dir: Path, rescore_fraction: float
) -> dict[str, Any]:
    analysis = ExampleAnalysis(
        final_epoch=config.epochs,
        seed=config.seed,
        rescore_fraction=rescore_fraction,
        batch_size=config.eval_batch_size,
    )
    _, result = pipeline_run(config, noisy, held_out, [analysis], save_dir)
    with open(save_dir / "examples.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "train"]
    rows.sort(key=lambda row: int(row["rank"]))
    with open(save_dir / "label_issues.csv", newline="") as handle:
        issues = [int(row["index"]) for row in csv.DictReader(handle) if row["split"] == "train"]
    per_epoch = [row["analysis_seconds"]["examples"] for row in result.history]
    return {
        "ranking": np.array([int(row["index"]) for row in rows]),
        "flagged": np.array(issues, dtype=np.int64),
        "analysis_seconds": per_epoch,
        "train_seconds": [row["train_seconds"] for row in result.history],
        "timings": dict(result.timings),
    }


def final_loss_ranking(config: Config, noisy: Any, held_out: Any, save_dir: Path) -> Any:
    model, result = pipeline_run(config, noisy, held_out, [], save_dir)
    device = resolve_device(config.device)
    started, started_cpu = time.perf_counter(), time.process_time()
    passed = evaluate(model, noisy, batch_size=config.eval_batch_size, device=device)
    extra, extra_cpu = time.perf_counter() - started, time.process_time() - started_cpu
    losses = -passed.probabilities[torch.arange(len(noisy)), noisy.targets].clamp_min(1e-38).log()
    return {
        "ranking": torch.argsort(losses, descending=True, stable=True).numpy(),
        "train_seconds": [row["train_seconds"] for row in result.history],
        "extra_pass_seconds": extra,
        "extra_pass_cpu_seconds": extra_cpu,
        "timings": dict(result.timings),
    }


def cleanlab_ranking(config: Config, noisy: Any, held_out: Any, save_dir: Path) -> dict:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold

    labels = noisy.targets.numpy()
    probabilities = np.zeros((labels.size, len(held_out.classes)), dtype=np.float32)
    folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=config.seed)
    device = resolve_device(config.device)
    for fold, (fit_on, predict) in enumerate(folds.split(np.zeros(labels.size), labels)):
        part = TensorImageDataset(
            noisy.images[fit_on], noisy.targets[fit_on], noisy.classes, noisy.normalization
        )
        unseen = TensorImageDataset(
            noisy.images[predict], noisy.targets[predict], noisy.classes, noisy.normalization
        )
        model, _ = pipeline_run(config, part, unseen, [], save_dir / f"fold{fold}")
        passed = evaluate(model, unseen, batch_size=config.eval_batch_size, device=device)
        probabilities[predict] = passed.probabilities.numpy()
    flagged = find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    rest = np.setdiff1d(np.arange(labels.size), flagged)
    rest = rest[np.argsort(quality[rest], kind="stable")]
    return {"ranking": np.concatenate([flagged, rest]), "flagged": np.asarray(flagged)}


def recording_cost(config: Config, train: Any, repeats: int) -> dict[str, Any]:
    """Seconds of one training epoch with and without the per-example record, alternating."""
    device = resolve_device(config.device)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    trials = [(False, True) if repeat % 2 == 0 else (True, False) for repeat in range(repeats)]
    for repeat, records in enumerate([(False,), *trials]):  # the first: a warm-up, not kept
        for record in records:
            torch.manual_seed(config.seed)
            model = default_model(len(train.classes), device).to(device)
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=config.lr, weight_decay=config.weight_decay
            )
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
            result, _, used = timed(
                partial(
                    train_epoch,
                    model,
                    train,
                    order,
                    optimizer,
                    batch_size=config.batch_size,
                    device=device,
                    label_smoothing=config.label_smoothing,
                    record_examples=record,
                )
            )
            if repeat > 0:
                seconds[record].append(result.seconds)
                cpu[record].append(used)
    plain, recorded = statistics.median(seconds[False]), statistics.median(seconds[True])
    plain_cpu, recorded_cpu = statistics.median(cpu[False]), statistics.median(cpu[True])
    # the record's own operations, alone: one batch of logits written into an [N] record
    record = TrainingDynamics.empty(len(train), device)
    logits = torch.randn(config.batch_size, len(train.classes), device=device)
    labels = torch.randint(0, len(train.classes), (config.batch_size,), device=device)
    positions = torch.randperm(len(train), device=device)[: config.batch_size]
    calls = 2000
    _, _, record_cpu = timed(
        lambda: [record.record(positions, logits, labels) for _ in range(calls)]
    )
    batches = -(-len(train) // config.batch_size)
    return {
        "record_cpu_seconds_per_batch": record_cpu / calls,
        "record_cpu_seconds_per_epoch": record_cpu / calls * batches,
        "epoch_seconds": {"without": seconds[False], "with": seconds[True]},
        "epoch_cpu_seconds": {"without": cpu[False], "with": cpu[True]},
        "median_without": plain,
        "median_with": recorded,
        "overhead": recorded / plain - 1,
        "cpu_overhead": recorded_cpu / plain_cpu - 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "mnist")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.02, 0.05, 0.10])
    parser.add_argument("--flip-seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="exigo vs plain runs, alternating")
    parser.add_argument("--recording-repeats", type=int, default=6)
    parser.add_argument("--no-cleanlab", action="store_true")
    parser.add_argument(
        "--rescore-fraction",
        type=float,
        default=0.2,
        help="exigo's end-of-epoch re-score cap (ExampleAnalysis(rescore_fraction=)); 0: off",
    )
    parser.add_argument("--json", type=Path, default=REPO / "save" / "label_noise.json")
    args, runner_args = parser.parse_known_args()

    config = parse_runner_options(["--data-dir", str(args.data_dir), *runner_args])
    threads = set_threads(config)
    train, held_out = load_mnist(config.data_dir, download=False)
    report: dict[str, Any] = {
        "threads": threads,
        "rescore_fraction": args.rescore_fraction,
        "epochs": config.epochs,
        "train_size": len(train),
        "torch": torch.__version__,
        "levels": [],
    }
    with tempfile.TemporaryDirectory() as scratch:
        for fraction in args.noise:
            labels, flipped = flip_labels(train.targets, fraction, 10, args.flip_seed)
            noisy = TensorImageDataset(train.images, labels, train.classes, train.normalization)
            truth = set(flipped.tolist())
            walls: dict[str, list[float]] = {"exigo": [], "final loss": [], "plain run": []}
            cpus: dict[str, list[float]] = {"exigo": [], "final loss": [], "plain run": []}
            phases: dict[str, list[dict[str, float]]] = {"exigo": [], "final loss": []}
            results: dict[str, Any] = {}
            for repeat in range(args.repeats):
                order = ("exigo", "final loss") if repeat % 2 == 0 else ("final loss", "exigo")
                for method in order:
                    save = Path(scratch) / f"{fraction}-{method}-{repeat}"
                    work = (
                        partial(exigo_ranking, rescore_fraction=args.rescore_fraction)
                        if method == "exigo"
                        else final_loss_ranking
                    )
                    outcome, wall, cpu = timed(partial(work, config, noisy, held_out, save))
                    walls[method].append(wall)
                    cpus[method].append(cpu)
                    if method == "final loss":  # the run alone, without the extra pass
                        walls["plain run"].append(wall - outcome["extra_pass_seconds"])
                        cpus["plain run"].append(cpu - outcome["extra_pass_cpu_seconds"])
                    phases[method].append(outcome["timings"])
                    results[method] = outcome
            level: dict[str, Any] = {
                "noise": fraction,
                "flipped": len(truth),
                "plain_run_seconds": statistics.median(walls["plain run"]),
                "plain_run_cpu_seconds": statistics.median(cpus["plain run"]),
                "phases": {
                    method: {
                        phase: statistics.median(run.get(phase, 0.0) for run in runs)
                        for phase in ("train", "evaluate", "analysis/examples", "figures")
                    }
                    for method, runs in phases.items()
                },
                "methods": {},
            }
            for method in ("exigo", "final loss"):
                outcome = results[method]
                extras = {k: v for k, v in outcome.items() if k not in ("ranking", "flagged")}
                level["methods"][method] = (
                    scores(outcome["ranking"], outcome.get("flagged"), truth)
                    | {
                        "wall_seconds": statistics.median(walls[method]),
                        "cpu_seconds": statistics.median(cpus[method]),
                        "walls": walls[method],
                    }
                    | extras
                )
            if not args.no_cleanlab:
                save = Path(scratch) / f"{fraction}-cleanlab"
                outcome, wall, cpu = timed(partial(cleanlab_ranking, config, noisy, held_out, save))
                level["methods"]["cleanlab"] = scores(
                    outcome["ranking"], outcome["flagged"], truth
                ) | {"wall_seconds": wall, "cpu_seconds": cpu}
            report["levels"].append(level)
            print(json.dumps(level, indent=1, default=float), flush=True)
    report["recording"] = recording_cost(config, train, args.recording_repeats)
    report["figure_cpu_seconds"] = figure_cost(train)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=float))
    print(table(report))


def table(report: dict[str, Any]) -> str:
    """The README's table."""
    lines = [
        "| noise (flipped) | method | precision@k = recall@k | own list: size, precision, "
        "recall | wall s (vs the plain run) | CPU s (vs the plain run) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for level in report["levels"]:
        plain, plain_cpu = level["plain_run_seconds"], level["plain_run_cpu_seconds"]
        for method, values in level["methods"].items():
            flagged = (
                f"{values['flagged']}, {values['flagged_precision']:.3f}, "
                f"{values['flagged_recall']:.3f}"
                if "flagged" in values
                else "–"
            )
            lines.append(
                f"| {level['noise']:.0%} ({level['flipped']}) | {method} | "
                f"{values['precision_at_k']:.4f} | {flagged} | {values['wall_seconds']:.1f} "
                f"({values['wall_seconds'] / plain - 1:+.0%}) | {values['cpu_seconds']:.1f} "
                f"({values['cpu_seconds'] / plain_cpu - 1:+.0%}) |"
            )
    recording = report["recording"]
    count = len(recording["epoch_seconds"]["with"])
    epoch_cpu = statistics.median(recording["epoch_cpu_seconds"]["without"])
    share = recording["record_cpu_seconds_per_epoch"] / epoch_cpu
    plain = ", ".join(
        f"{level['plain_run_seconds']:.1f} s ({level['plain_run_cpu_seconds']:.1f} CPU-s)"
        for level in report["levels"]
    )
    phases = "; ".join(
        f"{level['noise']:.0%}: "
        + ", ".join(
            f"{method} {' / '.join(f'{name} {value:.2f}' for name, value in values.items())}"
            for method, values in level["phases"].items()
        )
        for level in report["levels"]
    )
    lines += [
        "",
        f"Plain run (no analysis): {plain}. Phases (s, medians): {phases}. "
        f"Recording: one training epoch {recording['median_without']:.2f} s without, "
        f"{recording['median_with']:.2f} s with ({recording['overhead']:+.1%} wall, "
        f"{recording['cpu_overhead']:+.1%} CPU; medians of {count}, alternating); the record's "
        f"own operations {1e6 * recording['record_cpu_seconds_per_batch']:.0f} µs CPU per batch, "
        f"{1e3 * recording['record_cpu_seconds_per_epoch']:.1f} ms per epoch "
        f"({share:.2%} "
        "of the epoch's CPU time). Drawing the two figures (the figure worker's share, per "
        "epoch): "
        + ", ".join(f"{name} {value:.2f}" for name, value in report["figure_cpu_seconds"].items())
        + " CPU-s.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

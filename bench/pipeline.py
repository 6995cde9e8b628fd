"""The whole `python runner.py` pipeline, phase by phase, against the targets of issue 7.

    python bench/pipeline.py --data-dir ../shared/mnist [--repeats 3] [--json save/bench.json]
                             [--no-end-to-end] [--compare-with OTHER_CHECKOUT]
                             [--verbose] [-- runner options...]

1. In this process, fresh, through exigo's public API only: `import torch`, the exigo imports,
   the options parsed by `exigo.cli` (`build_parser`, `config_from_args`; options after `--`
   are passed on), the MNIST decode (`exigo.data.load_mnist`), then `exigo.pipeline.run` with
   `exigo.cli.default_model` and `exigo.analyses.default_analyses`, as `runner.py` runs them.
   The phases come from the run's own timing points, `RunResult.timings` (summed over epochs:
   setup, training, evaluation, each analysis, the wait for the figure worker, metrics,
   checkpoints, report) and the metrics rows (training, evaluation and each analysis per
   epoch); the analyses before training are the difference of the two. Around them: start-up,
   the whole run, CPU seconds of this process and of the figure worker, peak RSS.
2. On the trained model: saliency maps of the 2,000 held-out images (median of 3) and a cold
   t-SNE of the projection's points (`exigo.analyses.projection`), each alone.
3. End to end, as subprocesses, start to exit, interleaved, `--repeats` times each:
   `python runner.py`, `python runner.py --no-attribution-checks` and `python bench/
   training_only.py` (the same run with no analysis: training, evaluation, checkpoints; the
   baseline of issue 22); medians, CPU seconds (with the figure worker), the largest peak RSS
   and the ratio whole run / training only: of the medians, and repeat by repeat (each
   whole run against the training-only run of its own repeat, which cancels the drift of the
   machine's speed over minutes). `--compare-with` interleaves the two `runner.py`
   runs of another checkout (say `git worktree add /tmp/before <commit>`), so both see the
   same load.

Prints one Markdown table (phase, wall, CPU, target) and writes the same numbers as JSON.
Other processes that share the CPU slow every phase down; the table records the load average
before and after.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # before any heavy import: start-up is measured from here

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/pipeline.py` from a checkout, exigo not installed
TRAINING_ONLY = Path(__file__).resolve().with_name("training_only.py")

from training_only import parse_runner_options, set_threads  # noqa: E402  (bench/, light)

#: (key, target, "max" or "min"): the targets of issue 7 for 2 epochs with the defaults.
TARGETS = {
    "end_to_end_seconds_no_attribution_checks": (15.0, "max"),
    "held_out_accuracy": (0.98, "min"),
    "saliency_images_per_second": (2000.0, "min"),
    "tsne_seconds_first_epoch": (5.0, "max"),  # a cold t-SNE of 2,000 points
    "peak_rss_mb": (1536.0, "max"),
    "startup_seconds": (3.0, "max"),
}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return {
        "cpu": cpu,
        "cores": cores,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _loop_seconds(timings: dict[str, float], before_training: dict[str, float]) -> float:
    """Seconds of `run()`'s own thread that its timings account for.

    With the analyses beside the next epoch, each epoch's analyses, figures and commit run on
    the analyses' thread, at the same time as the next epoch's training: the loop's thread
    spends only setup, the analyses before training, training, evaluation and the wait for
    that thread (summing every phase would count the overlapped seconds twice and leave a
    negative remainder). Otherwise every phase is the loop's.
    """
    if timings.get("waiting for analyses", 0.0) > 0:
        loop = ("setup", "train", "evaluate", "waiting for analyses")
        return sum(timings.get(phase, 0.0) for phase in loop) + sum(before_training.values())
    return sum(timings.values())


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _reaped_children_cpu(timeout: float = 5.0) -> float:
    """CPU seconds of this process' children, once every child has been reaped.

    `run()` stops its figure worker without waiting for it; the executor's thread reaps it a
    moment later, and only then do its CPU seconds count in `RUSAGE_CHILDREN` (read at once,
    they were 0). Linux lists a process' live and unreaped children in
    `/proc/self/task/*/children`; elsewhere this reads at once.
    """
    deadline = time.monotonic() + timeout
    tasks = Path("/proc/self/task")
    while tasks.is_dir() and time.monotonic() < deadline:
        children = []
        for task in tasks.iterdir():
            with contextlib.suppress(OSError):
                children += (task / "children").read_text().split()
        if not children:
            break
        time.sleep(0.05)
    return _children_cpu()


def peak_rss_mb(usage: resource.struct_rusage) -> float:
    # ru_maxrss is in kilobytes on Linux, bytes on macOS
    return usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def in_process(data_dir: Path, save_dir: Path, runner_args: list[str], verbose: bool) -> dict:
    """Run the pipeline in this process as `runner.py` does, through the public API only.

    Returns:
        The start-up timers, `RunResult.timings`, the metrics rows' per-epoch seconds, CPU
        seconds and peak RSS; under `_model`, `_held_out`, `_config` what the measurements
        that follow need.
    """
    start = time.perf_counter()
    import torch

    imported_torch = time.perf_counter()
    from rich.console import Console

    import exigo.analyses
    import exigo.cli
    import exigo.data
    import exigo.pipeline
    from exigo.engine.devices import resolve_device

    imported_exigo = time.perf_counter()

    argv = ["--data-dir", str(data_dir), "--save-dir", str(save_dir), *runner_args]
    config = parse_runner_options(argv)
    threads = set_threads(config)
    begin = time.perf_counter()
    train_data, held_out = exigo.data.load_mnist(config.data_dir, download=config.download)
    decode_seconds = time.perf_counter() - begin
    torch.manual_seed(config.seed)  # runner.py's initial weights
    model = exigo.cli.default_model(len(train_data.classes), resolve_device(config.device))
    analyses = exigo.analyses.default_analyses(config)
    console = Console() if verbose else Console(quiet=True)

    run_called, run_cpu = time.perf_counter(), time.process_time()
    result = exigo.pipeline.run(config, model, train_data, held_out, analyses, console=console)
    finished = time.perf_counter()
    process_cpu, worker_cpu = time.process_time(), _reaped_children_cpu()  # the figure worker
    if result.failed_analyses:
        raise SystemExit(f"the run recorded failures: {result.failed_analyses}")

    timings, history = result.timings, result.history
    train_seconds = [row["train_seconds"] for row in history]
    # `timings` sums every call of an analysis, the metrics rows only the epochs': the
    # difference is the call before training (epoch 0)
    before_training = {
        analysis.name: timings.get(f"analysis/{analysis.name}", 0.0)
        - sum(row["analysis_seconds"].get(analysis.name, 0.0) for row in history)
        for analysis in analyses
        if analysis.before_training
    }
    run_seconds = finished - run_called
    startup_seconds = imported_exigo - _STARTED + decode_seconds
    return {
        "threads": threads,
        "import_torch_seconds": imported_torch - start,
        "import_exigo_seconds": imported_exigo - imported_torch,
        "decode_seconds": decode_seconds,
        "startup_seconds": startup_seconds,
        "run_called_seconds": run_called - _STARTED,
        # the epoch loop starts after `setup` and the analyses before training (give or take
        # opening the TensorBoard log)
        "first_epoch_seconds": run_called
        - _STARTED
        + timings.get("setup", 0.0)
        + sum(before_training.values()),
        "timings": dict(timings),
        "before_training_seconds": before_training,
        "train_seconds": train_seconds,
        "train_images_per_second": [len(train_data) / s for s in train_seconds],
        "eval_seconds": [row["eval_seconds"] for row in history],
        "analysis_seconds": {
            analysis.name: [row["analysis_seconds"].get(analysis.name, math.nan) for row in history]
            for analysis in analyses
        },
        "run_seconds": run_seconds,
        "run_cpu_seconds": process_cpu - run_cpu,
        "outside_phases_seconds": run_seconds - _loop_seconds(timings, before_training),
        "held_out_accuracy": history[-1]["eval_accuracy"],
        "process_seconds": finished - _STARTED,
        "process_cpu_seconds": process_cpu,
        "worker_cpu_seconds": worker_cpu,
        "peak_rss_mb": peak_rss_mb(resource.getrusage(resource.RUSAGE_SELF)),
        "_model": model,
        "_held_out": held_out,
        "_config": config,
    }


def saliency_rate(model: Any, held_out: Any, repeats: int = 3) -> dict[str, float]:
    """Images per second of `saliency_maps` over the whole held-out set (median of `repeats`)."""
    from exigo.analyses.saliency import saliency_maps

    model.eval()
    images, labels = held_out.images, held_out.targets
    saliency_maps(model, images[:256], labels[:256], normalization=held_out.normalization)
    times, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        saliency_maps(model, images, labels, normalization=held_out.normalization)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    seconds = statistics.median(times)
    return {
        "images": images.shape[0],
        "seconds": seconds,
        "cpu_seconds": statistics.median(cpu),
        "images_per_second": len(images) / seconds,
    }


def tsne_seconds(model: Any, held_out: Any, config: Any, repeats: int = 3) -> dict[str, Any]:
    """Seconds of a cold t-SNE (PCA start, exaggeration phase) of the projection's points.

    The points are those `ProjectionAnalysis` shows (`stratified_indices` with the run's limit
    and seed), embedded by the trained model: the last epoch's t-SNE input, started cold.
    """
    import torch

    from exigo.analyses.projection import MIN_TSNE_POINTS, stratified_indices, tsne_layout

    indices = stratified_indices(held_out.targets, config.projection_limit, config.seed)
    if indices.numel() < MIN_TSNE_POINTS:
        return {}
    model.eval()
    with torch.no_grad():
        embeddings = model.embed(held_out.images[indices])  # (K, hidden)
    times, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        tsne_layout(embeddings, seed=config.seed)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return {
        "points": embeddings.shape[0],
        "seconds": statistics.median(times),
        "cpu_seconds": statistics.median(cpu),
        "runs": times,
    }


def end_to_end(
    data_dir: Path,
    runner_args: list[str],
    repeats: int,
    scratch: Path,
    compare_with: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Wall and CPU seconds and peak RSS of whole runs, each a subprocess, start to exit.

    Variants: `default` (`runner.py`: each epoch's analyses beside the next one's training),
    `no_attribution_checks`, `sequential` (`--sequential`: analyses after each epoch) and
    `training_only` (`bench/training_only.py`: no analyses). With `compare_with` (another
    checkout), its `runner.py` runs too, keyed `compare:<variant>`. Each repeat runs every
    variant once, in reverse order every other repeat, so that all see the same load.
    """
    runner = REPO / "runner.py"
    variants: dict[str, tuple[Path, Path, list[str]]] = {
        "default": (REPO, runner, []),
        "no_attribution_checks": (REPO, runner, ["--no-attribution-checks"]),
        "sequential": (REPO, runner, ["--sequential"]),  # analyses after each epoch (issue 22)
        "training_only": (REPO, TRAINING_ONLY, []),
    }
    if compare_with is not None:
        for name in ("default", "no_attribution_checks"):
            variants[f"compare:{name}"] = (
                compare_with,
                compare_with / "runner.py",
                variants[name][2],
            )
    results: dict[str, dict[str, Any]] = {
        name: {"seconds": [], "cpu_seconds": [], "peak_rss_mb": [], "held_out_accuracy": []}
        for name in variants
    }
    for repeat in range(repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in order:
            repo, script, extra = variants[name]
            save_dir = scratch / f"{name.replace(':', '-')}-{repeat}"
            command = [
                sys.executable,
                str(script),
                "--data-dir",
                str(data_dir),
                "--save-dir",
                str(save_dir),
                *extra,
                *runner_args,
            ]
            start = time.perf_counter()
            child = subprocess.Popen(
                command, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            _, status, usage = os.wait4(child.pid, 0)
            seconds = time.perf_counter() - start
            code = os.waitstatus_to_exitcode(status)
            stderr = child.stderr.read().decode() if child.stderr else ""
            if child.stderr:
                child.stderr.close()
            child.returncode = code
            if code != 0:
                raise SystemExit(f"{' '.join(command)} exited with {code}:\n{stderr}")
            history = json.loads((save_dir / "metrics.json").read_text())
            results[name]["seconds"].append(seconds)
            results[name]["peak_rss_mb"].append(peak_rss_mb(usage))
            results[name]["cpu_seconds"].append(usage.ru_utime + usage.ru_stime)
            results[name]["held_out_accuracy"].append(history[-1]["eval_accuracy"])
    for result in results.values():
        result["median_seconds"] = statistics.median(result["seconds"])
        result["median_cpu_seconds"] = statistics.median(result["cpu_seconds"])
        result["max_peak_rss_mb"] = max(result["peak_rss_mb"])
    if repeats:
        baseline = results["training_only"]
        for name in ("default", "no_attribution_checks", "sequential"):
            result = results[name]
            result["ratio_to_training_only"] = result["median_seconds"] / baseline["median_seconds"]
            # each repeat against the training-only run of the same repeat: the machine's speed
            # drifts over minutes (the training-only run alone took 7.5-13.4 s in one hour)
            paired = [
                whole / alone
                for whole, alone in zip(result["seconds"], baseline["seconds"], strict=True)
            ]
            result["ratios_to_training_only_per_repeat"] = paired
            result["median_ratio_per_repeat"] = statistics.median(paired)
    return results


def _per_epoch(values: list[float], digits: int = 2) -> str:
    return " / ".join(f"{value:.{digits}f}" for value in values)


def table(report: dict[str, Any]) -> str:
    """The Markdown table of `report`: phase, wall seconds (or rate), CPU seconds, target."""
    phases = report["in_process"]
    timings = phases["timings"]
    rows: list[tuple[str, str, str, str]] = []

    def add(what: str, value: str, cpu: str = "", target: str = "") -> None:
        rows.append((what, value, cpu, target))

    def verdict(key: str, value: float) -> str:
        limit, kind = TARGETS[key]
        ok = value <= limit if kind == "max" else value >= limit
        sign = "≤" if kind == "max" else "≥"
        shown = f"{limit:.0%}" if key == "held_out_accuracy" else f"{limit:,g}"
        return f"{sign} {shown} {'✓' if ok else '✗'}"

    e2e = report.get("end_to_end")
    if e2e:
        compared = report["compare_with"]
        labels = {
            "default": "`python runner.py`, start to exit (attribution checks on)",
            "no_attribution_checks": "`python runner.py --no-attribution-checks`",
            "sequential": "`python runner.py --sequential` (analyses after each epoch)",
            "training_only": "`python bench/training_only.py` (no analyses: training, "
            "evaluation, checkpoints)",
            "compare:default": f"  the same, {compared}",
            "compare:no_attribution_checks": f"  the same, --no-attribution-checks, {compared}",
        }
        for name, label in labels.items():
            if name not in e2e:
                continue
            result = e2e[name]
            runs = ", ".join(f"{s:.1f}" for s in result["seconds"])
            target = (
                verdict("end_to_end_seconds_no_attribution_checks", result["median_seconds"])
                if name == "no_attribution_checks"
                else ""
            )
            add(
                label,
                f"{result['median_seconds']:.1f} s (median of {runs})",
                f"{result['median_cpu_seconds']:.1f} s",
                target,
            )
        baseline = e2e["training_only"]
        ratios = [
            (
                e2e[name]["median_seconds"] / baseline["median_seconds"],
                e2e[name]["median_cpu_seconds"] / baseline["median_cpu_seconds"],
            )
            for name in ("default", "no_attribution_checks", "sequential")
        ]
        add(
            "whole run / training only (checks on; off; sequential)",
            "; ".join(f"{wall:.2f}x" for wall, _ in ratios),
            "; ".join(f"{cpu:.2f}x" for _, cpu in ratios),
        )
        add(
            "  the same, repeat by repeat (median; lowest-highest)",
            "; ".join(
                f"{e2e[name]['median_ratio_per_repeat']:.2f}x "
                f"({min(e2e[name]['ratios_to_training_only_per_repeat']):.2f}-"
                f"{max(e2e[name]['ratios_to_training_only_per_repeat']):.2f})"
                for name in ("default", "no_attribution_checks", "sequential")
            ),
        )
        share = (
            1 - e2e["no_attribution_checks"]["median_seconds"] / e2e["default"]["median_seconds"]
        )
        add("attribution checks' share of the default run", f"{share:.0%}", "", "≤ 20% (issue 8)")
    add("start-up: `import torch`", f"{phases['import_torch_seconds']:.2f} s")
    add("start-up: exigo imports", f"{phases['import_exigo_seconds']:.2f} s")
    add("start-up: MNIST decode (10,000 images)", f"{phases['decode_seconds']:.2f} s")
    add(
        "start-up: interpreter + imports + decode",
        f"{phases['startup_seconds']:.2f} s",
        "",
        verdict("startup_seconds", phases["startup_seconds"]),
    )
    add("`run()` called, after start (+ model, analyses)", f"{phases['run_called_seconds']:.2f} s")
    add("setup: from `run()` to the first epoch", f"{timings.get('setup', 0.0):.2f} s")
    before = phases["before_training_seconds"]
    if before:
        add("before training: " + ", ".join(before), f"{sum(before.values()):.2f} s")
    add("first epoch begins, after start", f"{phases['first_epoch_seconds']:.2f} s")
    add("training, per epoch", f"{_per_epoch(phases['train_seconds'])} s")
    add("training throughput", f"{_per_epoch(phases['train_images_per_second'], 0)} img/s")
    add("evaluation (2,000 images), per epoch", f"{_per_epoch(phases['eval_seconds'])} s")
    for name, seconds in phases["analysis_seconds"].items():
        add(f"analysis `{name}`, per epoch", f"{_per_epoch(seconds)} s")
    add(
        "figures: waiting for the figure worker before each commit",
        f"{timings.get('figures', 0.0):.2f} s",
    )
    add("metrics.json and TensorBoard scalars", f"{timings.get('metrics', 0.0):.2f} s")
    add("checkpoints (best.pt, last.pt)", f"{timings.get('checkpoints', 0.0):.2f} s")
    add("report.html", f"{timings.get('report', 0.0):.2f} s")
    add(
        "`run()` outside its loop's phases (TensorBoard open/close, gc, worker stop, ...)",
        f"{phases['outside_phases_seconds']:.2f} s",
    )
    add(
        "`run()`, whole (CPU: this process + figure worker)",
        f"{phases['run_seconds']:.2f} s",
        f"{phases['run_cpu_seconds']:.1f} + {phases['worker_cpu_seconds']:.1f} s",
    )
    saliency = report["saliency"]
    add(
        f"saliency maps of the {saliency['images']:,} held-out images",
        f"{saliency['images_per_second']:,.0f} img/s ({saliency['seconds']:.2f} s)",
        f"{saliency['cpu_seconds']:.2f} s",
        verdict("saliency_images_per_second", saliency["images_per_second"]),
    )
    if report.get("tsne"):
        alone = report["tsne"]
        add(
            f"t-SNE of the trained model's {alone['points']:,} projection points, cold, alone",
            f"{alone['seconds']:.2f} s",
            f"{alone['cpu_seconds']:.2f} s",
            verdict("tsne_seconds_first_epoch", alone["seconds"]),
        )
    add(
        "held-out accuracy after the last epoch",
        f"{phases['held_out_accuracy']:.2%}",
        "",
        verdict("held_out_accuracy", phases["held_out_accuracy"]),
    )
    rss = [phases["peak_rss_mb"]]
    if e2e:
        rss += [r["max_peak_rss_mb"] for name, r in e2e.items() if not name.startswith("compare")]
    add(
        "peak RSS (largest of all runs)",
        f"{max(rss):,.0f} MB",
        "",
        verdict("peak_rss_mb", max(rss)),
    )
    add(
        "in-process run, start to the end of `run()` (CPU: + figure worker)",
        f"{phases['process_seconds']:.1f} s",
        f"{phases['process_cpu_seconds']:.1f} + {phases['worker_cpu_seconds']:.1f} s",
    )

    info = report["machine"]
    load = report["load_average"]
    header = (
        f"{info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB, "
        f"torch {report['torch']} ({phases['threads']} threads), Python {info['python']}; "
        f"load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after; "
        f"options: {' '.join(report['runner_args']) or 'defaults'}. Seconds are summed over "
        "all epochs unless the row says per epoch; CPU: all threads of the process."
    )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    titles = ("phase", "wall", "CPU", "target")
    widths = [max(width, len(title)) for width, title in zip(widths, titles, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True)) + " |"

    lines = [header, "", line(titles), line(tuple("-" * w for w in widths))]
    lines += [line(row) for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/mnist"))
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end runs per variant")
    parser.add_argument("--json", type=Path, default=Path("save/bench.json"), help="output")
    parser.add_argument(
        "--no-end-to-end", dest="end_to_end", action="store_false", help="skip the subprocesses"
    )
    parser.add_argument("--verbose", action="store_true", help="show the pipeline's output")
    parser.add_argument(
        "--compare-with",
        type=Path,
        default=None,
        help="another checkout (e.g. a git worktree of an older commit) whose runner.py runs "
        "interleaved with this one's in the end-to-end timing",
    )
    parser.add_argument("runner_args", nargs="*", help="options for runner.py, after --")
    args = parser.parse_args()
    data_dir = args.data_dir.resolve()
    compare_with = args.compare_with.resolve() if args.compare_with else None
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="exigo-bench-") as scratch:
        phases = in_process(data_dir, Path(scratch) / "in-process", args.runner_args, args.verbose)
        import torch

        model, held_out, config = (
            phases.pop("_model"),
            phases.pop("_held_out"),
            phases.pop("_config"),
        )
        saliency = saliency_rate(model, held_out)
        tsne = tsne_seconds(model, held_out, config) or None
        e2e = (
            end_to_end(data_dir, args.runner_args, args.repeats, Path(scratch), compare_with)
            if args.end_to_end and args.repeats > 0
            else None
        )
    report = {
        "machine": machine(),
        "torch": torch.__version__,
        "runner_args": args.runner_args,
        "compare_with": str(compare_with) if compare_with else None,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "in_process": phases,
        "saliency": saliency,
        "tsne": tsne,
        "end_to_end": e2e,
        "targets": {key: {"limit": limit, "kind": kind} for key, (limit, kind) in TARGETS.items()},
    }
    print(table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n(JSON: {args.json})")


if __name__ == "__main__":
    main()

"""The whole `python runner.py` pipeline, phase by phase, against the targets of issue 7.

    python bench/pipeline.py --data-dir ../shared/mnist [--repeats 3] [--json save/bench.json]
                             [--no-end-to-end] [--compare-with OTHER_CHECKOUT]
                             [--inline-figures] [--verbose] [-- runner options...]

1. In this process, fresh: `import torch`, the exigo imports, the MNIST decode, then
   `exigo.cli.main` exactly as `python runner.py` calls it (options after `--` are passed on),
   with timers wrapped around the pipeline's pieces. From the metrics rows: seconds of
   training, evaluation and every analysis per epoch (and before training); from the timers:
   figure rendering (matplotlib + PNG + the TensorBoard image), every TensorBoard write,
   checkpoints, report.html, each t-SNE (with `--inline-figures` only: otherwise it runs in
   the figure helper process, inside the wait before committing); the time from start to the
   first training step;
   images per second of training; held-out accuracy; peak RSS.
2. On the trained model: saliency maps of the 2,000 held-out images (median of 3), images/s.
3. End to end: `python runner.py --data-dir ...` as a subprocess, start to exit, --repeats
   times with the attribution checks and as often with `--no-attribution-checks`
   (interleaved); medians, CPU seconds (with the figure helper) and the largest peak RSS.
   `--compare-with` interleaves the same runs of another checkout's `runner.py` (say
   `git worktree add /tmp/before <commit>`), so both see the same load.

`--inline-figures` draws the in-process run's figures in its own process, without the helper
process, to measure what the helper saves.

Prints one Markdown table (phase, value, target) and writes the same numbers as JSON. Other
processes that share the CPU slow every figure down; the table records the load average
before and after.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # before any heavy import: start-up is measured from here

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/pipeline.py` from a checkout, exigo not installed

#: (key, target, "max" or "min"): the targets of issue 7 for 2 epochs with the defaults.
TARGETS = {
    "end_to_end_seconds_no_attribution_checks": (15.0, "max"),
    "held_out_accuracy": (0.98, "min"),
    "saliency_images_per_second": (2000.0, "min"),
    "tsne_seconds_first_epoch": (5.0, "max"),  # a cold t-SNE of 2,000 points
    "peak_rss_mb": (1536.0, "max"),
    "startup_seconds": (3.0, "max"),
}


class Timers:
    """Wall and CPU seconds spent in wrapped functions, summed per name, and the calls' count.

    CPU seconds (`time.process_time`, all threads of this process) barely depend on the load
    of the machine: with one torch thread they estimate the wall time on an idle machine.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu_seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.events: dict[str, list[float]] = defaultdict(list)
        self._depth: dict[str, int] = defaultdict(int)

    def wrap(self, owner: Any, attribute: str, name: str, keep: bool = False) -> None:
        """Replace `owner.attribute` by a timed version that adds its seconds to `name`."""
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth[name]:  # a timed call inside another of the same name counts once
                return original(*args, **kwargs)
            self._depth[name] += 1
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth[name] -= 1
                elapsed = time.perf_counter() - start
                self.seconds[name] += elapsed
                self.cpu_seconds[name] += time.process_time() - cpu_start
                self.calls[name] += 1
                if keep:
                    self.events[name].append(elapsed)

        setattr(owner, attribute, timed)


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


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb(usage: resource.struct_rusage) -> float:
    # ru_maxrss is in kilobytes on Linux, bytes on macOS
    return usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def in_process(
    data_dir: Path, save_dir: Path, runner_args: list[str], verbose: bool, inline_figures: bool
) -> dict:
    """Run the pipeline in this process with timers; return the measured phases."""
    start = time.perf_counter()
    import torch

    imported_torch = time.perf_counter()
    import exigo.analyses
    import exigo.cli
    import exigo.data
    import exigo.pipeline
    import exigo.analyses.projection
    import exigo.report

    imported_exigo = time.perf_counter()

    timers = Timers()
    captured: dict[str, Any] = {}
    first_step: list[float] = []

    load_mnist = exigo.data.load_mnist

    def load_and_keep(*args: Any, **kwargs: Any) -> Any:
        begin = time.perf_counter()
        splits = load_mnist(*args, **kwargs)
        captured["decode_seconds"] = time.perf_counter() - begin
        captured["splits"] = splits
        return splits

    exigo.data.load_mnist = load_and_keep  # cli imports it when it runs, so it sees this one

    train_epoch = exigo.pipeline.train_epoch

    def train_and_mark(*args: Any, **kwargs: Any) -> Any:
        if not first_step:
            first_step.append(time.perf_counter())
        return train_epoch(*args, **kwargs)

    exigo.pipeline.train_epoch = train_and_mark
    timers.wrap(exigo.pipeline, "train_epoch", "train")
    timers.wrap(exigo.pipeline, "evaluate", "eval")

    pipeline_run = exigo.pipeline.run

    def run_and_keep(config: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        captured["model"] = model
        captured["threads"] = torch.get_num_threads()
        return pipeline_run(config, model, *args, **kwargs)

    exigo.pipeline.run = run_and_keep
    if inline_figures and hasattr(exigo.pipeline, "available_cpus"):
        exigo.pipeline.available_cpus = lambda: 1  # no helper process: figures drawn here

    analyse = exigo.pipeline._Run._analyse
    before_training: dict[str, float] = {}

    def analyse_and_keep(self: Any, ctx: Any, which: Any) -> dict[str, float]:
        seconds = analyse(self, ctx, which)
        if ctx.epoch == 0:
            before_training.update(seconds)
        return seconds

    exigo.pipeline._Run._analyse = analyse_and_keep

    from torch.utils.tensorboard import SummaryWriter

    tensorboard_methods = ("add_scalar", "add_image", "add_embedding", "add_figure")
    tensorboard_methods += ("add_histogram", "__init__", "flush", "close")
    for method in tensorboard_methods:
        timers.wrap(SummaryWriter, method, f"tensorboard.{method}")
    figure_cpu: dict[str, float] = defaultdict(float)
    figure_depth: list[str] = []
    methods = [m for m in ("save_figure", "draw_figure") if hasattr(exigo.pipeline.EpochContext, m)]
    for method in methods:
        timers.wrap(exigo.pipeline.EpochContext, method, "figures")
        original = getattr(exigo.pipeline.EpochContext, method)

        def count(ctx: Any, first: Any, second: Any, *args: Any, _call=original, **kwargs: Any):
            if figure_depth:  # draw_figure without a helper calls save_figure: count once
                return _call(ctx, first, second, *args, **kwargs)
            name = first if isinstance(first, str) else second  # draw_figure(name, ...)
            figure_depth.append(name)
            cpu_start = time.process_time()
            try:
                return _call(ctx, first, second, *args, **kwargs)
            finally:
                figure_depth.pop()
                figure_cpu[name] += time.process_time() - cpu_start

        setattr(exigo.pipeline.EpochContext, method, count)
    try:
        import exigo.figures.pool

        timers.wrap(exigo.figures.pool.FigureRenderer, "collect", "figure_wait")
    except ImportError:  # a checkout from before the helper process (for before/after tables)
        pass
    timers.wrap(exigo.pipeline, "save_checkpoint", "checkpoints")
    timers.wrap(exigo.report, "write_report", "report")
    # the t-SNE runs in the figure helper process: timed here only with --inline-figures
    timers.wrap(exigo.analyses.projection, "tsne_layout", "tsne", keep=True)
    project = exigo.analyses.projection.ProjectionAnalysis.__call__

    def project_and_keep(self: Any, ctx: Any) -> None:
        project(self, ctx)
        if self.indices is not None and ctx.eval is not None:  # the last epoch's, after the run
            captured["tsne_embeddings"] = ctx.eval.embeddings[self.indices].clone()

    exigo.analyses.projection.ProjectionAnalysis.__call__ = project_and_keep

    default_analyses = exigo.analyses.default_analyses

    def analyses_with_timers(config: Any) -> list[Any]:
        analyses = default_analyses(config)
        for analysis in analyses:
            kind = type(analysis)
            if not getattr(kind, "_bench_timed", False):
                timers.wrap(kind, "__call__", f"analysis:{analysis.name}")
                kind._bench_timed = True
        return analyses

    exigo.analyses.default_analyses = analyses_with_timers

    def tensorboard_total(seconds: dict[str, float]) -> float:
        return sum(value for key, value in seconds.items() if key.startswith("tensorboard."))

    argv = ["--data-dir", str(data_dir), "--save-dir", str(save_dir), *runner_args]
    output = io.StringIO()
    with contextlib.redirect_stdout(sys.stdout if verbose else output):
        code = exigo.cli.main(argv)
    finished = time.perf_counter()
    if code != 0:
        print(output.getvalue(), file=sys.stderr)
        raise SystemExit(f"the pipeline exited with code {code}")

    history = json.loads((save_dir / "metrics.json").read_text())
    train_data, held_out = captured["splits"]
    train_seconds = [row["train_seconds"] for row in history]
    analyses = list(history[0]["analysis_seconds"])
    tsne = list(timers.events.get("tsne", []))  # before the standalone t-SNE adds to it
    timers.seconds["tensorboard"] = tensorboard_total(timers.seconds)
    timers.cpu_seconds["tensorboard"] = tensorboard_total(timers.cpu_seconds)
    return {
        "exit_code": code,
        "threads": captured["threads"],
        "import_torch_seconds": imported_torch - start,
        "import_exigo_seconds": imported_exigo - imported_torch,
        "decode_seconds": captured["decode_seconds"],
        "startup_seconds": imported_exigo - _STARTED + captured["decode_seconds"],
        "first_training_step_seconds": first_step[0] - _STARTED,
        "before_training_seconds": before_training,
        "train_seconds": train_seconds,
        "train_images_per_second": [len(train_data) / s for s in train_seconds],
        "eval_seconds": [row["eval_seconds"] for row in history],
        "analysis_seconds": {
            name: [row["analysis_seconds"].get(name, float("nan")) for row in history]
            for name in analyses
        },
        "tsne_seconds": tsne,
        "cpu_seconds": dict(timers.cpu_seconds),
        "wall_seconds": dict(timers.seconds),
        "process_cpu_seconds": time.process_time(),
        "helper_cpu_seconds": _children_cpu(),
        "figures_seconds": timers.seconds["figures"],
        "figures": timers.calls["figures"],
        "figure_cpu_seconds": dict(figure_cpu),
        "tensorboard_seconds": timers.seconds["tensorboard"],
        "checkpoint_seconds": timers.seconds["checkpoints"],
        "report_seconds": timers.seconds["report"],
        "held_out_accuracy": history[-1]["eval_accuracy"],
        "pipeline_seconds": finished - start,
        "process_seconds": finished - _STARTED,
        "peak_rss_mb": peak_rss_mb(resource.getrusage(resource.RUSAGE_SELF)),
        "_model": captured["model"],
        "_tsne_embeddings": captured.get("tsne_embeddings"),
        "_held_out": held_out,
    }


def saliency_rate(model: Any, held_out: Any, repeats: int = 3) -> dict[str, float]:
    """Images per second of `saliency_maps` over the whole held-out set (median of `repeats`)."""
    from exigo.analyses.saliency import saliency_maps

    model.eval()
    images, labels = held_out.images, held_out.targets
    saliency_maps(model, images[:256], labels[:256], normalization=held_out.normalization)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        saliency_maps(model, images, labels, normalization=held_out.normalization)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "images": images.shape[0],
        "seconds": seconds,
        "images_per_second": len(images) / seconds,
    }


def tsne_seconds(embeddings: Any, repeats: int = 3) -> dict[str, float]:
    """Seconds of a cold t-SNE (PCA start, exaggeration phase) of `embeddings`, median."""
    from exigo.analyses.projection import tsne_layout

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tsne_layout(embeddings)
        times.append(time.perf_counter() - start)
    return {"points": embeddings.shape[0], "seconds": statistics.median(times), "runs": times}


def end_to_end(
    data_dir: Path,
    runner_args: list[str],
    repeats: int,
    scratch: Path,
    compare_with: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Wall and CPU seconds and peak RSS of `python runner.py` runs, with and without checks.

    With `compare_with` (another checkout), its `runner.py` runs too, interleaved with this
    one's so that both see the same load; its results are keyed `compare:<variant>`.
    """
    options = {"default": [], "no_attribution_checks": ["--no-attribution-checks"]}
    variants = {name: (REPO, extra) for name, extra in options.items()}
    if compare_with is not None:
        variants |= {f"compare:{name}": (compare_with, extra) for name, extra in options.items()}
    results: dict[str, dict[str, Any]] = {
        name: {"seconds": [], "cpu_seconds": [], "peak_rss_mb": [], "held_out_accuracy": []}
        for name in variants
    }
    for repeat in range(repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in order:
            repo, extra = variants[name]
            save_dir = scratch / f"{name.replace(':', '-')}-{repeat}"
            command = [
                sys.executable,
                str(repo / "runner.py"),
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
        result["max_peak_rss_mb"] = max(result["peak_rss_mb"])
    return results


def _per_epoch(values: list[float], digits: int = 2) -> str:
    return " / ".join(f"{value:.{digits}f}" for value in values)


def table(report: dict[str, Any]) -> str:
    """The Markdown table of `report`: phase, wall seconds (or rate), CPU seconds, target."""
    phases = report["in_process"]
    cpu = phases["cpu_seconds"]
    rows: list[tuple[str, str, str, str]] = []

    def add(what: str, value: str, cpu_key: str | None = None, target: str = "") -> None:
        cpu_text = f"{cpu[cpu_key]:.2f} s" if cpu_key in cpu else ""
        rows.append((what, value, cpu_text, target))

    def verdict(key: str, value: float) -> str:
        limit, kind = TARGETS[key]
        ok = value <= limit if kind == "max" else value >= limit
        sign = "≤" if kind == "max" else "≥"
        shown = f"{limit:.0%}" if key == "held_out_accuracy" else f"{limit:,g}"
        return f"{sign} {shown} {'✓' if ok else '✗'}"

    e2e = report.get("end_to_end")
    if e2e:
        for name, label in (
            ("default", "`python runner.py`, start to exit (attribution checks on)"),
            ("no_attribution_checks", "`python runner.py --no-attribution-checks`"),
        ):
            result = e2e[name]
            runs = ", ".join(f"{s:.1f}" for s in result["seconds"])
            target = (
                verdict("end_to_end_seconds_no_attribution_checks", result["median_seconds"])
                if name == "no_attribution_checks"
                else ""
            )
            rows.append(
                (
                    label,
                    f"{result['median_seconds']:.1f} s (median of {runs})",
                    f"{statistics.median(result['cpu_seconds']):.1f} s",
                    target,
                )
            )
        if "compare:default" in e2e:
            for name, label in (
                ("compare:default", f"  the same, {report['compare_with']}"),
                (
                    "compare:no_attribution_checks",
                    f"  the same, --no-attribution-checks, {report['compare_with']}",
                ),
            ):
                result = e2e[name]
                runs = ", ".join(f"{s:.1f}" for s in result["seconds"])
                rows.append(
                    (
                        label,
                        f"{result['median_seconds']:.1f} s (median of {runs})",
                        f"{statistics.median(result['cpu_seconds']):.1f} s",
                        "",
                    )
                )
        share = (
            1 - e2e["no_attribution_checks"]["median_seconds"] / e2e["default"]["median_seconds"]
        )
        add("attribution checks' share of the default run", f"{share:.0%}", None, "≤ 20% (issue 8)")
    add("start-up: `import torch`", f"{phases['import_torch_seconds']:.2f} s")
    add("start-up: exigo imports", f"{phases['import_exigo_seconds']:.2f} s")
    add("start-up: MNIST decode (10,000 images)", f"{phases['decode_seconds']:.2f} s")
    add(
        "start-up: interpreter + imports + decode",
        f"{phases['startup_seconds']:.2f} s",
        None,
        verdict("startup_seconds", phases["startup_seconds"]),
    )
    before = phases["before_training_seconds"]
    add("before training: " + ", ".join(before), f"{sum(before.values()):.2f} s")
    add("first training step, after start", f"{phases['first_training_step_seconds']:.2f} s")
    add("training, per epoch", f"{_per_epoch(phases['train_seconds'])} s", "train")
    add("training throughput", f"{_per_epoch(phases['train_images_per_second'], 0)} img/s")
    add("evaluation (2,000 images), per epoch", f"{_per_epoch(phases['eval_seconds'])} s", "eval")
    for name, seconds in phases["analysis_seconds"].items():
        add(f"analysis `{name}`, per epoch", f"{_per_epoch(seconds)} s", f"analysis:{name}")
    tsne = phases["tsne_seconds"]
    if tsne:
        add(
            "  t-SNE inside `projection`, per epoch (first: cold, with openTSNE's import)",
            f"{_per_epoch(tsne)} s",
            "tsne",
        )
    add(
        f"  {phases['figures']} figures: `save_figure`/`draw_figure` (hand-off or render)",
        f"{phases['figures_seconds']:.2f} s",
        "figures",
    )
    add(
        "  figures: waiting for the helper (t-SNE, figures), rendering the rest here",
        f"{phases['wall_seconds'].get('figure_wait', 0.0):.2f} s",
        "figure_wait",
    )
    add(
        "TensorBoard writing (every add_*, flush, close)",
        f"{phases['tensorboard_seconds']:.2f} s",
        "tensorboard",
    )
    add("checkpoints (best.pt, last.pt)", f"{phases['checkpoint_seconds']:.2f} s", "checkpoints")
    add("report.html", f"{phases['report_seconds']:.2f} s", "report")
    saliency = report["saliency"]
    add(
        f"saliency maps of the {saliency['images']:,} held-out images",
        f"{saliency['images_per_second']:,.0f} img/s ({saliency['seconds']:.2f} s)",
        None,
        verdict("saliency_images_per_second", saliency["images_per_second"]),
    )
    if report.get("tsne"):
        alone = report["tsne"]
        add(
            f"t-SNE of the last epoch's {alone['points']:,} embeddings, cold start, alone",
            f"{alone['seconds']:.2f} s",
            None,
            verdict("tsne_seconds_first_epoch", alone["seconds"]),
        )
    add(
        "held-out accuracy after the last epoch",
        f"{phases['held_out_accuracy']:.2%}",
        None,
        verdict("held_out_accuracy", phases["held_out_accuracy"]),
    )
    rss = [phases["peak_rss_mb"]]
    if e2e:
        rss += [r["max_peak_rss_mb"] for name, r in e2e.items() if not name.startswith("compare")]
    add(
        "peak RSS (largest of all runs)",
        f"{max(rss):,.0f} MB",
        None,
        verdict("peak_rss_mb", max(rss)),
    )
    rows.append(
        (
            "in-process run, start to exit (CPU: + figure helper process)",
            f"{phases['process_seconds']:.1f} s",
            f"{phases['process_cpu_seconds']:.1f} + {phases['helper_cpu_seconds']:.1f} s",
            "",
        )
    )

    info = report["machine"]
    load = report["load_average"]
    header = (
        f"{info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB, "
        f"torch {report['torch']} ({phases['threads']} threads), Python {info['python']}; "
        f"load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after; "
        f"options: {' '.join(report['runner_args']) or 'defaults'}. Seconds are summed over "
        "both epochs unless the row says per epoch; CPU: all threads of the process."
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
    parser.add_argument(
        "--inline-figures",
        action="store_true",
        help="in-process run: draw figures in the run's process, not in the helper (A/B)",
    )
    parser.add_argument("runner_args", nargs="*", help="options for runner.py, after --")
    args = parser.parse_args()
    data_dir = args.data_dir.resolve()
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="exigo-bench-") as scratch:
        phases = in_process(
            data_dir,
            Path(scratch) / "in-process",
            args.runner_args,
            args.verbose,
            args.inline_figures,
        )
        import torch

        saliency = saliency_rate(phases.pop("_model"), phases.pop("_held_out"))
        embeddings = phases.pop("_tsne_embeddings")
        tsne = tsne_seconds(embeddings) if embeddings is not None else None
        e2e = (
            end_to_end(data_dir, args.runner_args, args.repeats, Path(scratch), args.compare_with)
            if args.end_to_end
            else None
        )
    report = {
        "machine": machine(),
        "torch": torch.__version__,
        "runner_args": args.runner_args,
        "inline_figures": args.inline_figures,
        "compare_with": str(args.compare_with.resolve()) if args.compare_with else None,
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

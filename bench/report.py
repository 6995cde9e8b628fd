"""report.html over a long run: its size and its rebuild time after every epoch (issue 21).

    python bench/report.py --data-dir ../shared/mnist --epochs 100 --save-dir /tmp/report-100

A real run of the default CNN and the default analyses (every figure at its usual size), on a
tiny training subset (`--train-size` images, default 256) so that 100 epochs take minutes: the
figures' sizes depend on the analyses, not on the training set. `exigo.report.write_report` is
wrapped to time each rebuild (inside the run, where it runs after every epoch) and to read the
page's size. Prints one Markdown row per marked epoch (`--marks`, default 2, 12 and the last)
and writes every epoch's numbers as JSON (`--json`).

    python bench/report.py --replay save --epochs 100 --save-dir /tmp/report-replay

replays a finished run instead (the default two-epoch run): epoch k gets a copy of the run's
figures of its epoch 1 or 2 (alternately) and its metrics row, then `write_report` runs as the
pipeline runs it after every epoch. Same figure sizes, no training: the report's own cost in
seconds, on a machine too busy for 100 real epochs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/report.py` from a checkout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "mnist")
    parser.add_argument("--save-dir", type=Path, default=Path("/tmp/exigo-report-bench"))
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--marks", default="2,12")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--replay", type=Path, default=None, metavar="RUN_DIR")
    args = parser.parse_args()
    measured = replay(args) if args.replay else real_run(args)
    marks = sorted({int(mark) for mark in args.marks.split(",")} | {args.epochs})
    print(
        "| epochs | report.html | rebuild after the last epoch, wall / CPU "
        "| median of the last 10 rebuilds, wall / CPU |"
    )
    print("| --- | --- | --- | --- |")
    for mark in marks:
        upto = [m for m in measured if m["epoch"] <= mark]
        if not upto:
            continue
        last = upto[-1]
        recent = upto[-10:]
        wall = sorted(m["seconds"] for m in recent)[len(recent) // 2]
        cpu = sorted(m["cpu"] for m in recent)[len(recent) // 2]
        print(
            f"| {mark} | {last['bytes'] / 1e6:.1f} MB "
            f"| {last['seconds']:.2f} / {last['cpu']:.2f} s "
            f"| {wall:.2f} / {cpu:.2f} s |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(measured, indent=1))


def replay(args: argparse.Namespace) -> list[dict[str, float]]:
    """Rebuild the report after each of `args.epochs` epochs made of a finished run's files."""
    import shutil

    from exigo.report import write_report

    source, target = args.replay, args.save_dir
    rows = json.loads((source / "metrics.json").read_text())
    shutil.rmtree(target, ignore_errors=True)
    (target / "plots").mkdir(parents=True)
    shutil.copyfile(source / "run.json", target / "run.json")
    for init in (source / "plots").glob("*_init.png"):
        shutil.copyfile(init, target / "plots" / init.name)
    measured = []
    history = []
    for epoch in range(1, args.epochs + 1):
        original = rows[(epoch - 1) % len(rows)]
        for figure in (source / "plots").glob(f"*_{original['epoch']}.png"):
            stem = figure.name[: -len(f"_{original['epoch']}.png")]
            shutil.copyfile(figure, target / "plots" / f"{stem}_{epoch}.png")
        history.append({**original, "epoch": epoch, "best": epoch <= 2 * args.epochs // 3})
        (target / "metrics.json").write_text(json.dumps(history))
        started, cpu = time.perf_counter(), time.process_time()
        path = write_report(target)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        measured.append(
            {"epoch": epoch, "seconds": seconds, "cpu": cpu, "bytes": path.stat().st_size}
        )
    return measured


def real_run(args: argparse.Namespace) -> list[dict[str, float]]:
    """Train `args.epochs` epochs on a tiny subset, timing every `write_report` of the run."""

    import torch
    from rich.console import Console

    import exigo.report
    from exigo.analyses import default_analyses
    from exigo.cli import default_model
    from exigo.config import Config
    from exigo.data import TensorImageDataset, load_mnist
    from exigo.pipeline import run

    train, held_out = load_mnist(args.data_dir, download=False)

    def subset(data: TensorImageDataset, size: int) -> TensorImageDataset:
        return TensorImageDataset(
            data.images[:size], data.targets[:size], data.classes, data.normalization
        )

    config = Config(
        epochs=args.epochs,
        save_dir=args.save_dir,
        data_dir=args.data_dir,
        projection_limit=min(500, args.val_size),
        run_name="report-bench",
    )
    torch.set_num_threads(1)
    measured: list[dict[str, float]] = []
    real = exigo.report.write_report

    def timed(save_dir: Path) -> Path:
        started = time.perf_counter()
        path = real(save_dir)
        seconds = time.perf_counter() - started
        rows = json.loads((Path(save_dir) / "metrics.json").read_text())
        measured.append({"epoch": len(rows), "seconds": seconds, "bytes": path.stat().st_size})
        return path

    exigo.report.write_report = timed
    torch.manual_seed(config.seed)
    model = default_model(len(train.classes), torch.device("cpu"))
    run(
        config,
        model,
        subset(train, args.train_size),
        subset(held_out, args.val_size),
        default_analyses(config),
        console=Console(quiet=True),
        verbose=False,
    )
    return measured


if __name__ == "__main__":
    main()

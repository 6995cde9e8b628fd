"""Time per epoch on three input shapes: training, evaluation and each analysis (issue 17.5).

    python bench/shapes.py 28          # MNIST (../shared/mnist, 8,000 / 2,000), MnistCNN
    python bench/shapes.py 32          # 3x32x32 coloured shapes, 4 classes, SmallResNet
    python bench/shapes.py 224         # 3x224x224 coloured shapes, 4 classes, resnet18
    options: --train 400 --val 100 --epochs 2 --budget 1.0 --threads 0

Each run goes through `exigo.pipeline.run` with the default analyses and `--sequential`, so
every phase is timed alone; the default models of `runner.py` (`exigo.cli.default_model`,
random weights) and its thread rule. The shapes are synthetic (`shapes`): a square, disc,
horizontal or vertical bar in a random colour on noise. Prints the budget line the pipeline
chose and one Markdown row: seconds per epoch, averaged over the epochs each part ran in.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/shapes.py` from a checkout

import torch  # noqa: E402


def shapes(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels float [count, 3, size, size] in [0, 1] and labels int64 [count] in 0..3."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (count,), generator=generator)
    pixels = 0.3 * torch.rand(count, 3, size, size, generator=generator)
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    unit = size / 32
    for index, label in enumerate(labels.tolist()):
        cy, cx = (torch.randint(10, 22, (2,), generator=generator) * unit).tolist()
        colour = 0.5 + 0.5 * torch.rand(3, 1, 1, generator=generator)
        dy, dx = (y - cy).abs() / unit, (x - cx).abs() / unit
        mask = [
            (dy <= 6) & (dx <= 6),
            dy**2 + dx**2 <= 49,
            (dy <= 2) & (dx <= 9),
            (dy <= 9) & (dx <= 2),
        ][label]
        pixels[index] = torch.where(mask, colour, pixels[index])
    return pixels, labels


def main() -> None:
    from exigo.analyses import default_analyses
    from exigo.cli import _set_threads, default_model
    from exigo.config import Config
    from exigo.data import Normalization, TensorImageDataset, load_dataset
    from exigo.pipeline import run

    parser = argparse.ArgumentParser()
    parser.add_argument("shape", choices=["28", "32", "224"])
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--budget", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        config = Config(
            epochs=args.epochs,
            save_dir=Path(folder) / "save",
            sequential=True,
            analysis_budget=args.budget,
            threads=args.threads,
        )
        _set_threads(config.threads)
        if args.shape == "28":
            train, held_out = load_dataset("mnist", REPO.parent / "shared" / "mnist")
        else:
            size = int(args.shape)
            train_pixels, train_labels = shapes(args.train, size, seed=0)
            val_pixels, val_labels = shapes(args.val, size, seed=1)
            mean = train_pixels.mean(dim=(0, 2, 3))
            std = train_pixels.std(dim=(0, 2, 3))
            norm = Normalization(tuple(mean.tolist()), tuple(std.tolist()))
            names = ["square", "disc", "horizontal bar", "vertical bar"]
            train = TensorImageDataset(norm.normalize(train_pixels), train_labels, names, norm)
            held_out = TensorImageDataset(norm.normalize(val_pixels), val_labels, names, norm)
        torch.manual_seed(config.seed)
        shape = tuple(train.images.shape[1:])
        model = default_model(len(train.classes), torch.device("cpu"), shape)
        result = run(config, model, train, held_out, default_analyses(config))

    rows = result.history
    parts = {"training": [r["train_seconds"] for r in rows]}
    parts["evaluation"] = [r["eval_seconds"] for r in rows]
    for name in rows[-1]["analysis_seconds"]:
        parts[name] = [r["analysis_seconds"][name] for r in rows if name in r["analysis_seconds"]]
    ran = {name: len(values) for name, values in parts.items()}
    cells = [
        f"{statistics.mean(values):.1f}" + ("" if ran[name] == len(rows) else f" ({ran[name]}x)")
        for name, values in parts.items()
    ]
    print(
        f"| {'x'.join(map(str, shape))} {type(model).__name__}, {len(train)}/{len(held_out)} | "
        + " | ".join(cells)
        + f" | {rows[-1]['eval_accuracy']:.0%} |"
    )
    print("| columns: " + ", ".join(parts))


if __name__ == "__main__":
    main()

"""Regenerate the README's figures in docs/pics/ from a real run of the pipeline.

    python docs/make_pics.py                      # trains on ../shared/mnist, about a minute
    python docs/make_pics.py --data-dir DIR       # any torchvision MNIST root
    python docs/make_pics.py --from-run save      # reuse a finished run's plots/ instead

The run is `python runner.py --confusion-normalize` with default settings (2 epochs, seed 0),
written to a temporary folder. For every analysis the script keeps the figure from the start
(`{name}_init.png` when the analysis also runs before training, else `{name}_1.png`) and the
one from the last epoch, plus the t-SNE animation `tsne.gif`, and stores each in docs/pics/
under its pipeline name, re-encoded as a 256-colour PNG and scaled down only when that is
still larger than `--max-kb`. PNGs already in docs/pics/ are removed first, so no figure of an
analysis that is gone survives.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from io import BytesIO
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PICS = REPO / "docs" / "pics"
FIGURE = re.compile(r"^(?P<stem>.+)_(?P<epoch>init|\d+)\.png$")


def run_pipeline(data_dir: Path, save_dir: Path) -> None:
    """Run the MNIST pipeline with default settings into `save_dir`.

    Args:
        data_dir: torchvision root holding `MNIST/raw/`.
        save_dir: an empty or exigo-written folder for the run's outputs.

    Raises:
        SystemExit: the run did not finish cleanly (its exit code).
    """
    sys.path.insert(0, str(REPO))
    from exigo.cli import main

    options = ["--data-dir", str(data_dir), "--save-dir", str(save_dir), "--no-download"]
    code = main([*options, "--confusion-normalize"])
    if code != 0:
        raise SystemExit(f"the run failed with exit code {code}; no figure was replaced")


def start_and_end(plots: Path) -> dict[str, list[Path]]:
    """The first and last figure of every analysis in a run's `plots/` folder.

    Args:
        plots: the run's `plots/` folder, holding `{name}_{epoch}.png` and `{name}_init.png`.

    Returns:
        Analysis name -> `[start, end]` paths (one path when the run has a single figure).
    """
    epochs: dict[str, dict[int, Path]] = {}
    for path in plots.glob("*.png"):
        match = FIGURE.match(path.name)
        if match:
            epoch = 0 if match["epoch"] == "init" else int(match["epoch"])
            epochs.setdefault(match["stem"], {})[epoch] = path
    chosen = {}
    for stem, by_epoch in sorted(epochs.items()):
        first, last = by_epoch[min(by_epoch)], by_epoch[max(by_epoch)]
        chosen[stem] = [first] if first == last else [first, last]
    return chosen


def small_png(source: Path, max_bytes: int) -> bytes:
    """`source` as a 256-colour PNG of at most `max_bytes`, scaled down only when needed.

    Plots use few colours, so a palette loses nothing visible and shrinks the file about
    threefold; the image is scaled by 0.85 per try until it fits.

    Args:
        source: a PNG file.
        max_bytes: the largest encoded size accepted.

    Returns:
        The encoded PNG.
    """
    image = Image.open(source).convert("RGB")
    scale = 1.0
    while True:
        size = (round(image.width * scale), round(image.height * scale))
        resized = image if scale == 1.0 else image.resize(size, Image.Resampling.LANCZOS)
        buffer = BytesIO()
        resized.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            buffer, format="PNG", optimize=True
        )
        if buffer.tell() <= max_bytes or min(size) < 100:
            return buffer.getvalue()
        scale *= 0.85


def copy_figures(plots: Path, pics: Path, max_bytes: int) -> list[Path]:
    """Write the start and end figures of every analysis, and `tsne.gif`, into `pics`.

    Args:
        plots: a finished run's `plots/` folder.
        pics: the destination; its PNGs and GIFs are deleted first.
        max_bytes: the largest PNG written.

    Returns:
        The files written, in name order.
    """
    pics.mkdir(parents=True, exist_ok=True)
    for old in [*pics.glob("*.png"), *pics.glob("*.gif")]:
        old.unlink()
    written = []
    for paths in start_and_end(plots).values():
        for path in paths:
            target = pics / path.name
            target.write_bytes(small_png(path, max_bytes))
            written.append(target)
    animation = plots / "tsne.gif"
    if animation.is_file() and animation.stat().st_size <= max_bytes:
        shutil.copyfile(animation, pics / animation.name)
        written.append(pics / animation.name)
    return sorted(written)


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline (or read a finished run) and refresh docs/pics/.

    Args:
        argv: command-line options; None reads `sys.argv[1:]`.

    Returns:
        The process exit code, 0.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=REPO.parent / "shared" / "mnist",
        help="torchvision MNIST root (default: %(default)s)",
    )
    parser.add_argument(
        "--from-run", type=Path, help="a finished run's --save-dir to take the figures from"
    )
    parser.add_argument("--out", type=Path, default=PICS, help="default: %(default)s")
    parser.add_argument(
        "--max-kb", type=int, default=150, help="largest PNG, KiB (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="exigo-pics-") as scratch:
        save_dir = args.from_run
        if save_dir is None:
            save_dir = Path(scratch) / "save"
            run_pipeline(args.data_dir, save_dir)
        written = copy_figures(save_dir / "plots", args.out, args.max_kb * 1024)
    for path in written:
        print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}", end="  ")
        print(f"{path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

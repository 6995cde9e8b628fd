"""One entry point for every dataset exigo loads by name: `load_dataset("cifar10", root)`.

| name | what | read by |
| --- | --- | --- |
| `mnist` | handwritten digits, 1x28x28, 10 classes | `mnist` |
| `fashion-mnist`, `kmnist` | clothes / cursive Japanese, 1x28x28, 10 classes | `torchvision_sets` |
| `cifar10`, `cifar100` | small photos, 3x32x32, 10 / 100 classes | `torchvision_sets` |
| `svhn` | house-number digits, 3x32x32, 10 classes | `torchvision_sets` |
| `imagefolder` | your images, one sub-folder per class | `image_folder` |

(modules of `exigo.data`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from exigo.config import DATASETS
from exigo.data.datasets import DataError
from exigo.data.image_folder import MEMORY_LIMIT, load_image_folder
from exigo.data.mnist import load_mnist
from exigo.data.torchvision_sets import TORCHVISION_SETS, load_torchvision_set

__all__ = ["DATASETS", "load_dataset"]


def load_dataset(
    name: str,
    root: str | Path,
    *,
    download: bool = True,
    val_fraction: float = 0.2,
    seed: int = 0,
    memory_limit: int = MEMORY_LIMIT,
    log: Callable[[str], None] = print,
) -> tuple[Dataset, Dataset]:
    """The training and held-out sets of a dataset named on the command line (`--dataset`).

    Args:
        name: one of `DATASETS`.
        root: the torchvision root (downloads go there), or the image folder.
        download: let torchvision download absent files (not for `imagefolder`).
        val_fraction: `imagefolder` without a `val/` folder: share of each class held out.
        seed: seeds that split.
        memory_limit: `imagefolder`: bytes of decoded images held in memory; above, streamed.
        log: receives the lines that say how an image folder is read.

    Returns:
        `(train, held_out)`: datasets of `(image [C, H, W], label)` carrying `classes`,
        `normalization` and `source` (`TensorImageDataset`, or a `StreamedImageDataset` for a
        large image folder).

    Raises:
        DataError: an unknown name (the message lists the names), or data that is missing,
            cannot be downloaded or is corrupt (the message names the file and what to do).
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: the names are {', '.join(DATASETS)}")
    root = Path(root)
    if name == "imagefolder":
        return load_image_folder(
            root, val_fraction=val_fraction, seed=seed, memory_limit=memory_limit, log=log
        )
    if name == "mnist":
        train, held_out = load_mnist(root, download=download)
        for split in (train, held_out):
            split.source = f"mnist (MNIST, torchvision root {root})"
        return train, held_out
    assert name in TORCHVISION_SETS
    return load_torchvision_set(name, root, download=download)

"""Image data: datasets held in memory, their normalisation, and the loaders exigo ships.

- `exigo.data.normalization`: `Normalization`, `MNIST_NORMALIZATION`, the blank image and the
  way back to displayable pixels;
- `exigo.data.datasets`: `TensorImageDataset`, `DataError` and the batching the pipeline uses
  over any `(image [C, H, W], label)` dataset;
- `exigo.data.mnist`: MNIST's files, checked and decoded (`load_mnist`).

Every public name is importable from `exigo.data` itself.
"""

from exigo.data import datasets, mnist, normalization
from exigo.data.datasets import (
    DataError,
    TensorImageDataset,
    dataset_targets,
    gather,
    iterate_batches,
)
from exigo.data.mnist import MNIST_FILES, load_mnist
from exigo.data.normalization import (
    MNIST_NORMALIZATION,
    Normalization,
    blank_image,
    display_pixels,
)

__all__ = [
    "MNIST_FILES",
    "MNIST_NORMALIZATION",
    "DataError",
    "Normalization",
    "TensorImageDataset",
    "blank_image",
    "dataset_targets",
    "datasets",
    "display_pixels",
    "gather",
    "iterate_batches",
    "load_mnist",
    "mnist",
    "normalization",
]

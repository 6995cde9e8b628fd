"""Image data: datasets held in memory, their normalisation, and the loaders exigo ships.

- `exigo.data.normalization`: `Normalization`, `MNIST_NORMALIZATION`, the blank image and the
  way back to displayable pixels;
- `exigo.data.datasets`: `TensorImageDataset`, `DataError` and the batching the pipeline uses
  over any `(image [C, H, W], label)` dataset;
- `exigo.data.mnist`: MNIST's files, checked and decoded (`load_mnist`);
- `exigo.data.torchvision_sets`: Fashion-MNIST, KMNIST, CIFAR-10/100 and SVHN through
  torchvision's dataset classes (`load_torchvision_set`);
- `exigo.data.image_folder`: a folder of class sub-folders (`load_image_folder`);
- `exigo.data.catalog`: `load_dataset(name, root)`, the one entry point for `--dataset`.

Every public name is importable from `exigo.data` itself.
"""

from exigo.data import catalog, datasets, image_folder, mnist, normalization, torchvision_sets
from exigo.data.catalog import DATASETS, load_dataset
from exigo.data.datasets import (
    DataError,
    StreamedImageDataset,
    TensorImageDataset,
    class_names_of,
    data_source,
    dataset_targets,
    gather,
    iterate_batches,
)
from exigo.data.image_folder import ImageFiles, load_image_folder
from exigo.data.mnist import MNIST_FILES, load_mnist
from exigo.data.normalization import (
    MNIST_NORMALIZATION,
    Normalization,
    blank_image,
    display_pixels,
)
from exigo.data.torchvision_sets import TORCHVISION_SETS, load_torchvision_set

__all__ = [
    "DATASETS",
    "MNIST_FILES",
    "MNIST_NORMALIZATION",
    "TORCHVISION_SETS",
    "DataError",
    "ImageFiles",
    "Normalization",
    "StreamedImageDataset",
    "TensorImageDataset",
    "blank_image",
    "catalog",
    "class_names_of",
    "data_source",
    "dataset_targets",
    "datasets",
    "display_pixels",
    "gather",
    "image_folder",
    "iterate_batches",
    "load_dataset",
    "load_image_folder",
    "load_mnist",
    "load_torchvision_set",
    "mnist",
    "normalization",
    "torchvision_sets",
]

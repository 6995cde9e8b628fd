"""Labelled images held in memory, and the batching the pipeline uses over any dataset.

A `TensorImageDataset` keeps a whole split as one normalised float tensor: batches are slices
of it taken by index, with no per-item PIL conversion and no collate step inside the training
loop. Any other `torch.utils.data.Dataset` of `(image [C, H, W], label)` pairs works with the
pipeline too; it is then read through a `DataLoader`. Loaders of particular datasets
(`exigo.data.mnist`, `exigo.data.torchvision_sets`, `exigo.data.image_folder`) return
`TensorImageDataset`s, or a `StreamedImageDataset` when the decoded images would not fit in
memory (read through a `DataLoader` with worker processes), and raise `DataError` with what
to do. Both record where their images came from (`source`, shown in run.json and the report).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from exigo.data.normalization import Normalization

__all__ = [
    "DataError",
    "StreamedImageDataset",
    "TensorImageDataset",
    "class_names_of",
    "data_source",
    "dataset_targets",
    "gather",
    "iterate_batches",
]


class DataError(Exception):
    """The dataset is missing, cannot be downloaded, or is corrupt; the message says what to do."""


class TensorImageDataset(Dataset):
    """A labelled image set held as two tensors.

    Attributes:
        images: float32 tensor [N, C, H, W], normalised with `normalization`.
        targets: int64 tensor [N], class indices in [0, len(classes)).
        classes: display name of each class.
        normalization: how `images` were made from pixel intensities.
        source: where the images came from (`"cifar10, torchvision root save/data"`), for
            run.json and the report; None: given from Python.
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        classes: Sequence[str],
        normalization: Normalization | None = None,
        source: str | None = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(
                f"targets must be [N] with N={images.shape[0]}, got {tuple(targets.shape)}"
            )
        self.images = images
        self.targets = targets.long()
        self.classes = list(classes)
        self.normalization = normalization
        self.source = source

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.targets[index]


class StreamedImageDataset(Dataset):
    """A labelled image set decoded item by item, for sets too large to hold in memory.

    Subclasses implement `pixels(index)`; the pipeline reads it through a `DataLoader` with
    `workers` worker processes (`iterate_batches`), so decoding overlaps training.

    Args:
        targets: int64 tensor [N], class indices.
        classes: display name of each class.
        normalization: applied to every decoded image.
        source: where the images come from (run.json, the report).
        workers: `DataLoader` worker processes (0: decode in the loop's own process).

    Attributes:
        targets: as given.
        classes: as given.
        normalization: as given.
        source: as given.
        workers: as given.
    """

    def __init__(
        self,
        targets: Tensor,
        classes: Sequence[str],
        normalization: Normalization,
        source: str,
        workers: int,
    ) -> None:
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.classes = list(classes)
        self.normalization = normalization
        self.source = source
        self.workers = workers

    def pixels(self, index: int) -> Tensor:
        """Decode one image.

        Args:
            index: its position.

        Returns:
            Float tensor [C, H, W] of intensities in [0, 1].
        """
        raise NotImplementedError(f"{type(self).__name__} must implement pixels(index)")

    def __len__(self) -> int:
        return self.targets.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.normalization.normalize(self.pixels(index)[None])[0]
        return image, self.targets[index]


def data_source(dataset: Dataset) -> str:
    """Where a dataset's images came from, as run.json and the report say it.

    Args:
        dataset: a training or validation set.

    Returns:
        Its `source` when an exigo loader made it, else `given from Python (ClassName)`.
    """
    source = (
        dataset.source if isinstance(dataset, TensorImageDataset | StreamedImageDataset) else None
    )
    return source or f"given from Python ({type(dataset).__name__})"


def class_names_of(dataset: Dataset, class_names: Sequence[str] | None = None) -> list[str]:
    """The display name of every class: given, the dataset's `classes`, or "0".."K-1".

    Args:
        dataset: the validation set.
        class_names: names given by the caller (they win).

    Returns:
        One string per class; K is the largest label + 1 when nothing names the classes.
    """
    names = class_names or getattr(dataset, "classes", None)
    if not names:
        names = range(int(dataset_targets(dataset).max()) + 1)
    return [str(name) for name in names]


def dataset_targets(dataset: Dataset) -> Tensor:
    """Every label of `dataset`, without decoding images when it can be avoided.

    Args:
        dataset: `(image, label)` pairs; its `targets` attribute is used when it has one.

    Returns:
        Int64 tensor [N] on the CPU, in dataset order.
    """
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def gather(dataset: Dataset, indices: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
    """Images and labels at `indices`.

    Args:
        dataset: a `TensorImageDataset` or any dataset of `(image [C, H, W], label)`.
        indices: int tensor [K] or a sequence of K indices.

    Returns:
        `(images, labels)`: float tensor [K, C, H, W] as the model takes them, int64 [K].
    """
    index = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(dataset, TensorImageDataset):
        return dataset.images[index], dataset.targets[index]
    if index.numel() == 0:
        raise ValueError("gather needs at least one index for a generic dataset")
    items = [dataset[int(i)] for i in index]
    images = torch.stack([torch.as_tensor(image) for image, _ in items])
    labels = torch.tensor([int(label) for _, label in items], dtype=torch.long)
    return images, labels


def iterate_batches(
    dataset: Dataset, indices: Sequence[int] | Tensor, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield `(images [B, C, H, W], labels [B])` for `indices`, in that order, on the CPU.

    A `TensorImageDataset` is sliced directly; any other dataset goes through a `DataLoader`
    that visits the same indices (with worker processes for a `StreamedImageDataset`).

    Args:
        dataset: `(image [C, H, W], label)` pairs.
        indices: int sequence or int64 tensor [M] of the items to visit, in visiting order.
        batch_size: items per batch (the last batch may be smaller).

    Yields:
        `(images, labels)`: the dataset's images [B, C, H, W] (float32 for a
        `TensorImageDataset`) and int64 labels [B].
    """
    index = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(dataset, TensorImageDataset):
        for batch in index.split(batch_size):
            yield dataset.images[batch], dataset.targets[batch]
        return
    workers = dataset.workers if isinstance(dataset, StreamedImageDataset) else 0
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=index.tolist(),
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )
    for images, labels in loader:
        yield images, torch.as_tensor(labels, dtype=torch.long)

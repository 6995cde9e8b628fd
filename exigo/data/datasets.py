"""Labelled images held in memory, and the batching the pipeline uses over any dataset.

A `TensorImageDataset` keeps a whole split as one normalised float tensor: batches are slices
of it taken by index, with no per-item PIL conversion and no collate step inside the training
loop. Any other `torch.utils.data.Dataset` of `(image [C, H, W], label)` pairs works with the
pipeline too; it is then read through a `DataLoader`. Loaders of particular datasets
(`exigo.data.mnist`) return `TensorImageDataset`s and raise `DataError` with what to do.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from exigo.data.normalization import Normalization

__all__ = ["DataError", "TensorImageDataset", "dataset_targets", "gather", "iterate_batches"]


class DataError(Exception):
    """The dataset is missing, cannot be downloaded, or is corrupt; the message says what to do."""


class TensorImageDataset(Dataset):
    """A labelled image set held as two tensors.

    Attributes:
        images: float32 tensor [N, C, H, W], normalised with `normalization`.
        targets: int64 tensor [N], class indices in [0, len(classes)).
        classes: display name of each class.
        normalization: how `images` were made from pixel intensities.
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        classes: Sequence[str],
        normalization: Normalization | None = None,
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

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.targets[index]


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
    that visits the same indices.

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
    loader = DataLoader(dataset, batch_size=batch_size, sampler=index.tolist())
    for images, labels in loader:
        yield images, torch.as_tensor(labels, dtype=torch.long)

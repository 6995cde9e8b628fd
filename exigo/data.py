r"""Image data held in memory: MNIST through torchvision, and the batching the pipeline uses.

MNIST is decoded once by `torchvision.datasets.MNIST` into a uint8 tensor and normalised into
one float tensor, $x = (p - \mu) / \sigma$ with $p \in [0, 1]$ the pixel intensity and
$\mu = 0.1307$, $\sigma = 0.3081$ the training set's mean and standard deviation. Batches are
slices of that tensor taken by index: no per-item PIL conversion and no collate step inside the
training loop.

Any other `torch.utils.data.Dataset` of `(image [C, H, W], label)` pairs works with the
pipeline too; it is then read through a `DataLoader`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "MNIST_FILES",
    "MNIST_NORMALIZATION",
    "DataError",
    "Normalization",
    "TensorImageDataset",
    "dataset_targets",
    "gather",
    "iterate_batches",
    "load_mnist",
]


class DataError(Exception):
    """The dataset is missing, cannot be downloaded, or is corrupt; the message says what to do."""


@dataclass(frozen=True)
class Normalization:
    r"""Per-channel affine normalisation $x = (p - \mu_c) / \sigma_c$.

    Attributes:
        mean: one value per channel, in pixel-intensity units ([0, 1]).
        std: one positive value per channel.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def normalize(self, pixels: Tensor) -> Tensor:
        r"""Map pixel intensities to model inputs.

        Args:
            pixels: float tensor [N, C, H, W] in [0, 1].

        Returns:
            Float tensor [N, C, H, W], $(p - \mu) / \sigma$.
        """
        mean, std = self._stats(pixels)
        return (pixels - mean) / std

    def denormalize(self, images: Tensor) -> Tensor:
        r"""Map model inputs back to pixel intensities (the inverse of `normalize`).

        Args:
            images: float tensor [N, C, H, W], normalised.

        Returns:
            Float tensor [N, C, H, W], $x \sigma + \mu$ (in [0, 1] for real images).
        """
        mean, std = self._stats(images)
        return images * std + mean

    def blank(self, shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        r"""The normalised image of zero intensity everywhere (the saliency baseline).

        Args:
            shape: [N, C, H, W].
            device: where the tensor lives.

        Returns:
            Float tensor of `shape` whose channel c holds $-\mu_c / \sigma_c$.
        """
        return self.normalize(torch.zeros(tuple(shape), device=device))


MNIST_NORMALIZATION = Normalization(mean=(0.1307,), std=(0.3081,))

#: The four files torchvision reads, relative to the torchvision root (`--data-dir`).
MNIST_FILES = (
    "MNIST/raw/train-images-idx3-ubyte",
    "MNIST/raw/train-labels-idx1-ubyte",
    "MNIST/raw/t10k-images-idx3-ubyte",
    "MNIST/raw/t10k-labels-idx1-ubyte",
)


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


def _read_mnist_split(root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    """Decode one split with torchvision, translating its failures into `DataError`."""
    from torchvision.datasets import MNIST  # torchvision takes ~1.5 s to import: only here

    try:
        dataset = MNIST(root=str(root), train=train, download=download)
    except RuntimeError as error:  # torchvision's "not found" and download failures
        raise _missing_error(root, download, error) from None
    except (AssertionError, ValueError, OSError) as error:
        raise _corrupt_error(root, train, error) from None
    images, labels = dataset.data, dataset.targets
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise _corrupt_error(root, train, f"{images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def _missing_error(root: Path, download: bool, cause: object) -> DataError:
    expected = "\n".join(f"  {root / name}" for name in MNIST_FILES)
    how = f"downloading them failed ({cause})" if download else "--no-download is set"
    return DataError(
        f"MNIST not found under --data-dir {root} and {how}.\n"
        f"Expected these files:\n{expected}\n"
        "Point --data-dir at a torchvision root that holds them (offline: "
        "--data-dir ../shared/mnist), or allow the download."
    )


def _corrupt_error(root: Path, train: bool, cause: object) -> DataError:
    names = MNIST_FILES[:2] if train else MNIST_FILES[2:]
    culprit = _find_corrupt_file(root, names)
    where = culprit if culprit is not None else " or ".join(str(root / n) for n in names)
    return DataError(
        f"MNIST file {where} is corrupt or truncated ({cause}). "
        "Delete it and run again to download a fresh copy, or point --data-dir elsewhere."
    )


def _find_corrupt_file(root: Path, names: Sequence[str]) -> Path | None:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    for name in names:
        path = root / name
        reader = read_image_file if "images" in name else read_label_file
        try:
            reader(str(path))
        except Exception:
            return path
    return None


def load_mnist(
    root: str | Path, download: bool = True
) -> tuple[TensorImageDataset, TensorImageDataset]:
    """MNIST's training and held-out splits, decoded and normalised in memory.

    Args:
        root: torchvision root; the files live in `root/MNIST/raw/`.
        download: fetch the files when they are absent.

    Returns:
        `(train, held_out)`, each with images float32 [N, 1, 28, 28] normalised with
        `MNIST_NORMALIZATION` and targets int64 [N].

    Raises:
        DataError: the files are absent and cannot be downloaded, or are corrupt.
    """
    root = Path(root)
    classes = [str(digit) for digit in range(10)]
    splits = []
    for train in (True, False):
        raw_images, labels = _read_mnist_split(root, train, download)
        pixels = raw_images.unsqueeze(1).float().div_(255)  # (N, 1, 28, 28) in [0, 1]
        if labels.numel() and (labels.min() < 0 or labels.max() > 9):
            raise _corrupt_error(root, train, "labels outside 0-9")
        images = MNIST_NORMALIZATION.normalize(pixels)
        splits.append(TensorImageDataset(images, labels, classes, MNIST_NORMALIZATION))
    return splits[0], splits[1]


def dataset_targets(dataset: Dataset) -> Tensor:
    """Every label of `dataset`, int64 [N], without decoding images when it can be avoided."""
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
    """
    index = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(dataset, TensorImageDataset):
        for batch in index.split(batch_size):
            yield dataset.images[batch], dataset.targets[batch]
        return
    loader = DataLoader(dataset, batch_size=batch_size, sampler=index.tolist())
    for images, labels in loader:
        yield images, torch.as_tensor(labels, dtype=torch.long)

r"""Image data held in memory: MNIST's IDX files, and the batching the pipeline uses.

MNIST's IDX files are decoded once into a uint8 tensor (torchvision only downloads them) and
normalised into one float tensor, $x = (p - \mu) / \sigma$ with $p \in [0, 1]$ the pixel
intensity and $\mu = 0.1307$, $\sigma = 0.3081$ the training set's mean and standard
deviation. Batches are slices of that tensor taken by index: no per-item PIL conversion and no
collate step inside the training loop.

Any other `torch.utils.data.Dataset` of `(image [C, H, W], label)` pairs works with the
pipeline too; it is then read through a `DataLoader`.
"""

from __future__ import annotations

import math
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
    "display_pixels",
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


def _read_idx(path: Path) -> Tensor:
    """The values of an uint8 IDX file that `_idx_problem` passed, as a uint8 tensor [N, ...].

    Reading the file directly instead of through `torchvision.datasets.MNIST` saves importing
    torchvision (~1.7 s, since torchvision.ops imports torch._dynamo) on every run: more than
    half of the start-up. Same result as torchvision's `read_image_file` / `read_label_file`
    (labels widened to int64 by `TensorImageDataset`); torchvision still downloads.
    """
    data = path.read_bytes()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    values = torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * ndim)
    return values.view(dims)


def _read_mnist_split(root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    """Decode one split (its files already checked), or have torchvision download it first."""
    names = MNIST_FILES[:2] if train else MNIST_FILES[2:]
    if all((root / name).is_file() for name in names):
        images, labels = _read_idx(root / names[0]), _read_idx(root / names[1])
    else:
        from torchvision.datasets import MNIST  # ~1.7 s to import: only to download

        try:
            dataset = MNIST(root=str(root), train=train, download=download)
        except RuntimeError as error:  # torchvision's "not found" and download failures
            _check_idx_files(root, names)  # or a downloaded file it could not decode
            raise _missing_error(root, download, error) from None
        except OSError as error:
            raise DataError(f"cannot read MNIST under --data-dir {root}: {error}") from None
        images, labels = dataset.data, dataset.targets
    if images.shape[0] != labels.shape[0]:
        raise _corrupt_error(
            root / names[1], f"{labels.shape[0]} labels for {images.shape[0]} images"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise _corrupt_error(root / names[1], "labels outside 0-9")
    return images, labels


def _missing_error(root: Path, download: bool, cause: object) -> DataError:
    missing = [name for name in MNIST_FILES if not (root / name).is_file()]
    expected = "\n".join(
        f"  {root / name}{'  (missing)' if name in missing else ''}" for name in MNIST_FILES
    )
    offline = "(offline: --data-dir ../shared/mnist)"
    if download:
        reason = " ".join(str(cause).split())  # torchvision's message spans several lines
        return DataError(
            f"MNIST not found under --data-dir {root}, and downloading it failed: {reason}\n"
            f"Expected these files:\n{expected}\n"
            f"Check the network connection, or point --data-dir at a torchvision root that "
            f"holds them {offline}."
        )
    return DataError(
        f"MNIST not found under --data-dir {root}, and --no-download is set.\n"
        f"Expected these files:\n{expected}\n"
        f"Point --data-dir at a torchvision root that holds them {offline}, "
        "or drop --no-download to download them."
    )


def _corrupt_error(path: Path, problem: str) -> DataError:
    return DataError(
        f"MNIST file {path} is corrupt or truncated: {problem}. Replace it with an intact copy "
        "(or delete it to have it downloaded again), or point --data-dir at another MNIST root."
    )


def _idx_problem(path: Path, shape_tail: tuple[int, ...]) -> str | None:
    """What is wrong with an IDX file of uint8 values shaped [N, *shape_tail], or None.

    IDX: bytes 0-1 zero, byte 2 the type (0x08: uint8), byte 3 the number of dimensions,
    then one big-endian uint32 per dimension, then the values.
    """
    ndim = 1 + len(shape_tail)
    header_size = 4 + 4 * ndim
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            header = handle.read(header_size)
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if len(header) < header_size:
        return f"{size} bytes, too short for an IDX header"
    if header[:2] != b"\0\0" or header[2] != 0x08 or header[3] != ndim:
        return f"header {header[:4].hex()} is not that of {ndim}-dimensional uint8 IDX data"
    dims = tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims[1:] != shape_tail:
        return f"holds items of shape {list(dims[1:])}, expected {list(shape_tail)}"
    expected = header_size + math.prod(dims)
    if size != expected:
        shape = " x ".join(map(str, dims))
        return f"{size} bytes, but its header announces {expected} bytes ({shape} values)"
    return None


def _check_idx_files(root: Path, names: Sequence[str]) -> None:
    """Raise `DataError` naming the first present file that is not intact; absent ones pass."""
    for name in names:
        path = root / name
        if path.is_file():
            problem = _idx_problem(path, (28, 28) if "images" in name else ())
            if problem is not None:
                raise _corrupt_error(path, problem)


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
    _check_idx_files(root, MNIST_FILES)  # before torchvision, which misreads damaged files
    splits = []
    for train in (True, False):
        raw_images, labels = _read_mnist_split(root, train, download)
        pixels = raw_images.unsqueeze(1).float().div_(255)  # (N, 1, 28, 28) in [0, 1]
        images = MNIST_NORMALIZATION.normalize(pixels)
        splits.append(TensorImageDataset(images, labels, classes, MNIST_NORMALIZATION))
    return splits[0], splits[1]


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


def display_pixels(images: Tensor, normalization: Normalization | None) -> Tensor:
    """Model inputs back to pixel intensities in [0, 1], for figures and overlays.

    Args:
        images: float tensor [N, C, H, W], normalised with `normalization`.
        normalization: how the images were made from pixels; None: each image is min-max
            stretched to [0, 1] (the original intensities are unknown).

    Returns:
        Float tensor [N, C, H, W] in [0, 1].
    """
    if normalization is not None:
        return normalization.denormalize(images).clamp(0, 1)
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    return (images - low) / (high - low).clamp_min(1e-12)


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

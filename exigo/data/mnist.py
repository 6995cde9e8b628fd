r"""MNIST (LeCun, Bottou, Bengio & Haffner 1998) from a torchvision root, checked and decoded.

The four IDX files under `root/MNIST/raw/` are checked before anything reads them (a damaged
download names the file and what is wrong with it), decoded once into uint8 tensors and
normalised with `MNIST_NORMALIZATION` into one float tensor per split. torchvision downloads
the files when they are absent.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from exigo.data.datasets import DataError, TensorImageDataset
from exigo.data.normalization import MNIST_NORMALIZATION

__all__ = ["MNIST_FILES", "load_mnist"]

#: The four files torchvision reads, relative to the torchvision root (`--data-dir`).
MNIST_FILES = (
    "MNIST/raw/train-images-idx3-ubyte",
    "MNIST/raw/train-labels-idx1-ubyte",
    "MNIST/raw/t10k-images-idx3-ubyte",
    "MNIST/raw/t10k-labels-idx1-ubyte",
)


def _read_mnist_split(root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    """Decode one split (its files already checked), or have torchvision download it first."""
    # Importing torchvision costs 1.2 s on its own, 0.1 s once torch._dynamo is loaded, which
    # the optimiser of every training run imports anyway (the README's measurements).
    from torchvision.datasets import MNIST
    from torchvision.datasets.mnist import read_image_file, read_label_file

    names = MNIST_FILES[:2] if train else MNIST_FILES[2:]
    if all((root / name).is_file() for name in names):
        images = read_image_file(str(root / names[0]))  # (N, 28, 28) uint8
        labels = read_label_file(str(root / names[1]))  # (N,) int64
    else:
        created = _first_missing(root / "MNIST" / "raw")  # torchvision creates it to download
        try:
            dataset = MNIST(root=str(root), train=train, download=download)
        except RuntimeError as error:  # torchvision's "not found" and download failures
            _check_idx_files(root, names)  # or a downloaded file it could not decode
            _remove(created)
            raise _missing_error(root, download, error) from None
        except OSError as error:
            _remove(created)
            raise DataError(f"cannot read MNIST under --data-dir {root}: {error}") from None
        images, labels = dataset.data, dataset.targets
    if images.shape[0] != labels.shape[0]:  # each file whole, but not a pair
        raise DataError(
            f"MNIST files {root / names[0]} ({images.shape[0]} images) and {root / names[1]} "
            f"({labels.shape[0]} labels) do not belong together: one of them is from another "
            "split or another copy. Replace them with the pair of one intact copy, or point "
            "--data-dir at another MNIST root."
        )
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise _corrupt_error(root / names[1], "labels outside 0-9")
    return images, labels


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of `folder`'s path that does not exist yet (None: it exists)."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists():
            return missing
        missing = path
    return missing


def _remove(created: Path | None) -> None:
    """Remove a folder tree this process created for a download that failed."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)


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

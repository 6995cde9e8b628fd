r"""The datasets torchvision downloads: Fashion-MNIST, KMNIST, CIFAR-10/100 and SVHN.

Each is read with torchvision's own dataset class (`torchvision.datasets.FashionMNIST`,
`KMNIST`, `CIFAR10`, `CIFAR100`, `SVHN`), which downloads the files into the torchvision root
(`--data-dir`) when they are absent and verifies the CIFAR and SVHN files against its MD5
checksums. exigo decodes both splits once into memory as normalised float tensors (the
largest, SVHN's 73,257 training images, takes 0.9 GB) and normalises each channel $c$ with
the training set's well-known statistics, $x = (p - \mu_c) / \sigma_c$ (`NORMALIZATIONS`).

The held-out split is the dataset's test split. Files that fail torchvision's checksum are
refused with a message naming the folder rather than read anyway: a modified copy of CIFAR
is not CIFAR (a subset of your own belongs in an image folder, `exigo.data.image_folder`).

References: Xiao, Rasul & Vollgraf 2017 (Fashion-MNIST); Clanuwat et al. 2018 (KMNIST);
Krizhevsky 2009 (CIFAR-10/100); Netzer et al. 2011 (SVHN).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exigo.data.datasets import DataError, TensorImageDataset
from exigo.data.normalization import Normalization

__all__ = ["NORMALIZATIONS", "TORCHVISION_SETS", "TorchvisionSet", "load_torchvision_set"]

_IDX_FILES = (
    "raw/train-images-idx3-ubyte",
    "raw/train-labels-idx1-ubyte",
    "raw/t10k-images-idx3-ubyte",
    "raw/t10k-labels-idx1-ubyte",
)

_CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


@dataclass(frozen=True)
class TorchvisionSet:
    """One dataset torchvision downloads, as exigo loads it.

    Attributes:
        name: the `--dataset` value.
        title: its display name.
        torchvision_class: the class in `torchvision.datasets`.
        files: the files torchvision reads, relative to the torchvision root.
        normalization: the training set's per-channel mean and standard deviation.
        classes: class names when torchvision's class does not carry them; () otherwise.
    """

    name: str
    title: str
    torchvision_class: str
    files: tuple[str, ...]
    normalization: Normalization
    classes: tuple[str, ...] = ()


#: Per-channel mean and standard deviation of each training set's pixel intensities (over
#: every pixel of every training image): the values torchvision's references and the papers'
#: code use.
NORMALIZATIONS = {
    "fashion-mnist": Normalization(mean=(0.2860,), std=(0.3530,)),
    "kmnist": Normalization(mean=(0.1918,), std=(0.3483,)),
    "cifar10": Normalization(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": Normalization(mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    "svhn": Normalization(mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970)),
}

TORCHVISION_SETS = {
    spec.name: spec
    for spec in (
        TorchvisionSet(
            "fashion-mnist",
            "Fashion-MNIST",
            "FashionMNIST",
            tuple(f"FashionMNIST/{name}" for name in _IDX_FILES),
            NORMALIZATIONS["fashion-mnist"],
        ),
        TorchvisionSet(
            "kmnist",
            "KMNIST",
            "KMNIST",
            tuple(f"KMNIST/{name}" for name in _IDX_FILES),
            NORMALIZATIONS["kmnist"],
        ),
        TorchvisionSet(
            "cifar10",
            "CIFAR-10",
            "CIFAR10",
            tuple(
                f"cifar-10-batches-py/{name}"
                for name in (
                    *(f"data_batch_{i}" for i in range(1, 6)),
                    "test_batch",
                    "batches.meta",
                )
            ),
            NORMALIZATIONS["cifar10"],
        ),
        TorchvisionSet(
            "cifar100",
            "CIFAR-100",
            "CIFAR100",
            ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
            NORMALIZATIONS["cifar100"],
        ),
        TorchvisionSet(
            "svhn",
            "SVHN",
            "SVHN",
            ("train_32x32.mat", "test_32x32.mat"),
            NORMALIZATIONS["svhn"],
            classes=tuple(str(digit) for digit in range(10)),
        ),
    )
}


def load_torchvision_set(
    name: str, root: str | Path, download: bool = True
) -> tuple[TensorImageDataset, TensorImageDataset]:
    """A torchvision dataset's training and test splits, decoded and normalised in memory.

    Args:
        name: a key of `TORCHVISION_SETS` (`"cifar10"`).
        root: the torchvision root; each dataset's files live where torchvision puts them
            (`TorchvisionSet.files`).
        download: let torchvision download the files when they are absent.

    Returns:
        `(train, held_out)`, each with images float32 [N, C, H, W] normalised with the
        dataset's `NORMALIZATIONS` entry, int64 targets [N], the dataset's class names and
        its `source`.

    Raises:
        DataError: the files are absent and cannot be downloaded, fail torchvision's
            checksum, or are corrupt; the message names the folder and what to do.
    """
    import torchvision.datasets

    spec = TORCHVISION_SETS[name]
    root = Path(root)
    dataset_class = getattr(torchvision.datasets, spec.torchvision_class)
    _check_idx_files(spec, root)
    created = _first_missing(root / spec.files[0])  # torchvision creates folders to download
    # torchvision downloads over files that fail its checksum; exigo refuses them instead
    download = download and any(not (root / name).is_file() for name in spec.files)
    splits = []
    try:
        for train in (True, False):
            if spec.name == "svhn":
                split = "train" if train else "test"
                dataset = dataset_class(root=str(root), split=split, download=download)
            else:
                dataset = dataset_class(root=str(root), train=train, download=download)
            splits.append(_decode(spec, root, dataset, "training" if train else "test"))
    except (RuntimeError, OSError) as error:  # torchvision's "not found", a failed download
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise _load_error(spec, root, download, error) from None
    return splits[0], splits[1]


def _decode(spec: TorchvisionSet, root: Path, dataset: object, split: str) -> TensorImageDataset:
    """One split of a constructed torchvision dataset as a normalised `TensorImageDataset`."""
    if spec.torchvision_class in ("FashionMNIST", "KMNIST"):
        raw = dataset.data.unsqueeze(1)  # type: ignore[attr-defined]  # (N, 1, 28, 28) uint8
        labels = dataset.targets  # type: ignore[attr-defined]
    elif spec.torchvision_class == "SVHN":
        raw = torch.from_numpy(dataset.data)  # type: ignore[attr-defined]  # (N, 3, 32, 32)
        labels = torch.from_numpy(np.asarray(dataset.labels))  # type: ignore[attr-defined]
    else:  # CIFAR: (N, 32, 32, 3) uint8
        raw = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)  # type: ignore[attr-defined]
        labels = torch.as_tensor(dataset.targets)  # type: ignore[attr-defined]
    classes = list(spec.classes or dataset.classes)  # type: ignore[attr-defined]
    labels = labels.long().flatten()
    if labels.shape[0] != raw.shape[0]:
        raise DataError(
            f"{spec.title} under --data-dir {root}: the {split} split has {raw.shape[0]} images "
            f"but {labels.shape[0]} labels; replace its files with an intact copy"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(
            f"{spec.title} under --data-dir {root}: the {split} split has labels outside "
            f"0-{len(classes) - 1}; replace its files with an intact copy"
        )
    mean, std = spec.normalization.stats(torch.empty(0))
    images = raw.float().div_(255).sub_(mean).div_(std).contiguous()  # in place: one copy
    source = f"{spec.name} ({spec.title}, torchvision root {root})"
    return TensorImageDataset(images, labels, classes, spec.normalization, source=source)


def _check_idx_files(spec: TorchvisionSet, root: Path) -> None:
    """Name the first damaged IDX file before torchvision misreads it (absent ones pass)."""
    from exigo.data.mnist import _idx_problem

    for name in spec.files if spec.torchvision_class in ("FashionMNIST", "KMNIST") else ():
        path = root / name
        if path.is_file():
            problem = _idx_problem(path, (28, 28) if "images" in name else ())
            if problem is not None:
                raise DataError(
                    f"{spec.title} file {path} is corrupt or truncated: {problem}. Replace it "
                    "with an intact copy (or delete it to have it downloaded again), or point "
                    "--data-dir at another torchvision root."
                )


def _first_missing(path: Path) -> Path | None:
    """The outermost folder above `path` that does not exist yet (None: its folder exists)."""
    missing = None
    for folder in path.parents:
        if folder.exists():
            return missing
        missing = folder
    return missing


def _load_error(
    spec: TorchvisionSet, root: Path, download: bool, cause: BaseException
) -> DataError:
    missing = [name for name in spec.files if not (root / name).is_file()]
    if not missing:
        return DataError(
            f"{spec.title} files under --data-dir {root} do not match torchvision's checksums "
            f"(damaged, or a modified copy: {' '.join(str(cause).split())}); delete "
            f"{root / Path(spec.files[0]).parts[0]} to have it downloaded again, or point "
            "--data-dir at an intact copy (your own subset belongs in --dataset imagefolder)"
        )
    expected = "\n".join(
        f"  {root / name}{'  (missing)' if name in missing else ''}" for name in spec.files
    )
    if download:
        reason = " ".join(str(cause).split())
        return DataError(
            f"{spec.title} not found under --data-dir {root}, and downloading it failed: "
            f"{reason}\nExpected these files:\n{expected}\nCheck the network connection, or "
            "point --data-dir at a torchvision root that holds them."
        )
    return DataError(
        f"{spec.title} not found under --data-dir {root}, and --no-download is set.\n"
        f"Expected these files:\n{expected}\nPoint --data-dir at a torchvision root that "
        "holds them, or drop --no-download to download them."
    )

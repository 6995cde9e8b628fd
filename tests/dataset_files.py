"""Tiny datasets written in the real on-disk formats torchvision and exigo read.

Each writer makes a few seeded images whose class is visible in the pixels (class c is
brightest in row band c), so a test can check that images and labels stay paired.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np


def pixels(count: int, channels: int, size: int, classes: int, seed: int = 0):
    """uint8 [count, channels, size, size] and int labels [count] (class c lights band c)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % classes
    images = rng.integers(0, 60, (count, channels, size, size), dtype=np.uint8)
    band = max(1, size // classes)
    for index, label in enumerate(labels):
        images[index, :, label * band : (label + 1) * band, :] = 250  # empty past the bottom
    return images, labels


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: two zero bytes, type 0x08 (uint8), the number of dimensions, big-endian sizes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(size).to_bytes(4, "big") for size in array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist_family(root: Path, folder: str, train: int = 30, test: int = 10) -> None:
    """`root/folder/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte` with 10 classes."""
    for prefix, count, seed in (("train", train, 0), ("t10k", test, 1)):
        images, labels = pixels(count, 1, 28, 10, seed)
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images[:, 0])
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels)


def _pickle(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(value))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar10(root: Path, per_batch: int = 6, test: int = 10) -> dict[str, str]:
    """`root/cifar-10-batches-py/`: five training batches, the test batch, batches.meta.

    Returns:
        File name -> MD5, for declaring the copy's checksums to torchvision.
    """
    folder = root / "cifar-10-batches-py"
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    for index, (name, count) in enumerate(
        [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test)]
    ):
        images, labels = pixels(count, 3, 32, 10, seed=index)
        data = images.reshape(count, 3 * 32 * 32)  # row-major R, G, B planes
        _pickle(folder / name, {"batch_label": name, "labels": labels.tolist(), "data": data})
    _pickle(folder / "batches.meta", {"label_names": names, "num_vis": 3072})
    return {path.name: md5(path) for path in folder.iterdir()}


def write_cifar100(root: Path, train: int = 20, test: int = 10) -> dict[str, str]:
    """`root/cifar-100-python/{train,test,meta}` with fine and coarse labels."""
    folder = root / "cifar-100-python"
    for name, count, seed in (("train", train, 0), ("test", test, 1)):
        images, labels = pixels(count, 3, 32, 100, seed)
        _pickle(
            folder / name,
            {
                "data": images.reshape(count, -1),
                "fine_labels": labels.tolist(),
                "coarse_labels": (labels // 5).tolist(),
            },
        )
    _pickle(
        folder / "meta",
        {
            "fine_label_names": [f"fine{i}" for i in range(100)],
            "coarse_label_names": [f"coarse{i}" for i in range(20)],
        },
    )
    return {path.name: md5(path) for path in folder.iterdir()}


def write_svhn(root: Path, train: int = 20, test: int = 10) -> dict[str, str]:
    """`root/{train,test}_32x32.mat`: X [32, 32, 3, N] uint8, y [N, 1] with 10 for digit 0."""
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for name, count, seed in (("train", train, 0), ("test", test, 1)):
        images, labels = pixels(count, 3, 32, 10, seed)
        y = np.where(labels == 0, 10, labels).reshape(-1, 1).astype(np.uint8)
        path = root / f"{name}_32x32.mat"
        scipy.io.savemat(path, {"X": images.transpose(2, 3, 1, 0), "y": y})
        checksums[path.name] = md5(path)
    return checksums


def write_image_folder(
    root: Path,
    classes: list[str],
    per_class: int = 6,
    size: int = 16,
    mode: str = "RGB",
    seed: int = 0,
) -> None:
    """`root/<class>/<i>.png`: PNG images whose class lights a row band."""
    from PIL import Image

    channels = 1 if mode == "L" else 3
    images, labels = pixels(per_class * len(classes), channels, size, len(classes), seed)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        array = image[0] if mode == "L" else image.transpose(1, 2, 0)
        Image.fromarray(array, mode=mode).save(folder / f"{index:03d}.png")

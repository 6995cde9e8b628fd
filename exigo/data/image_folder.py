r"""An image folder as a dataset: one sub-folder per class, read with torchvision's `ImageFolder`.

```
DATA_DIR/cat/001.png  DATA_DIR/dog/002.jpg ...                 a seeded --val-fraction is held out
DATA_DIR/train/cat/001.png ...  DATA_DIR/val/cat/101.png ...    the given split
```

torchvision's `ImageFolder` finds the classes (sorted sub-folder names) and the image files
(`torchvision.datasets.folder.IMG_EXTENSIONS`). exigo then opens every file once, before
training: a file that is not a readable image is named and the run stops. Images are made
RGB, or kept grey when every image is grey; images of another size than the most common one
are scaled and centre-cropped to it (`PIL.ImageOps.fit`, said once). When the decoded float
images fit in `memory_limit` (2 GiB by default) they are decoded once into memory; otherwise
they are streamed from disk through a `DataLoader` with worker processes.

Each channel $c$ is normalised with the training images' own statistics,
$x = (p - \mu_c) / \sigma_c$: all training images when they are decoded into memory, a
seeded sample of `STATISTICS_SAMPLE` of them when streamed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from exigo._system import available_cpus
from exigo.data.datasets import DataError, StreamedImageDataset, TensorImageDataset
from exigo.data.normalization import Normalization

__all__ = ["MEMORY_LIMIT", "STATISTICS_SAMPLE", "ImageFiles", "load_image_folder"]

#: Decoded float32 images up to this many bytes are held in memory; larger sets are streamed.
MEMORY_LIMIT = 2 * 1024**3

#: Training images whose pixels give the normalisation of a streamed image folder.
STATISTICS_SAMPLE = 2000

_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


class ImageFiles(StreamedImageDataset):
    """Image files decoded one at a time (the streamed form of an image folder).

    Args:
        paths: one file per image.
        targets: int64 tensor [N], class indices.
        classes: display name per class.
        normalization: applied to every decoded image.
        source: where the images come from (run.json, the report).
        workers: `DataLoader` worker processes.
        mode: PIL mode every image is converted to, `"L"` (1 channel) or `"RGB"` (3).
        size: `(height, width)` every image is fitted to.
    """

    def __init__(
        self,
        paths: Sequence[str],
        targets: Tensor,
        classes: Sequence[str],
        normalization: Normalization,
        source: str,
        workers: int,
        mode: str,
        size: tuple[int, int],
    ) -> None:
        super().__init__(targets, classes, normalization, source, workers)
        self.paths = list(paths)
        self.mode = mode
        self.size = size

    def pixels(self, index: int) -> Tensor:
        """Decode one image.

        Args:
            index: its position.

        Returns:
            Float tensor [C, H, W] in [0, 1].
        """
        return _decode(self.paths[index], self.mode, self.size).float().div_(255)


def load_image_folder(
    root: str | Path,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    memory_limit: int = MEMORY_LIMIT,
    workers: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[TensorImageDataset | ImageFiles, TensorImageDataset | ImageFiles]:
    """An image folder's training and held-out sets (see the module docstring).

    Args:
        root: a folder of class sub-folders, or one holding `train/` and `val/` folders of
            class sub-folders.
        val_fraction: share of each class held out when there is no `val/` folder, in (0, 1).
        seed: seeds that split.
        memory_limit: bytes the decoded float images may take in memory; above, they are
            streamed from disk.
        workers: `DataLoader` workers of a streamed folder; None: one less than the CPUs
            (1 to 4).
        log: receives the one line that says what was found and how it is read.

    Returns:
        `(train, held_out)`: `TensorImageDataset`s (images float32 [N, C, H, W], normalised)
        when they fit in `memory_limit`, else `ImageFiles`.

    Raises:
        DataError: no folder, fewer than 2 classes, a class without images, a `val/` class
            unknown to `train/`, or a file that is not a readable image (the first is named).
    """
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"--data-dir {root} is not a folder: --dataset imagefolder reads a folder of class "
            "sub-folders (or train/ and val/ folders of them)"
        )
    given_split = (root / "train").is_dir() and (root / "val").is_dir()
    train_root = root / "train" if (root / "train").is_dir() else root
    try:
        train_folder = ImageFolder(str(train_root))
    except FileNotFoundError as error:  # no class folder, or a class without image files
        raise DataError(f"image folder {train_root}: {error}") from None
    try:
        val_folder = ImageFolder(str(root / "val")) if given_split else None
    except FileNotFoundError as error:
        raise DataError(f"image folder {root / 'val'}: {error}") from None
    classes = list(train_folder.classes)
    if len(classes) < 2:
        raise DataError(
            f"image folder {train_root} has {len(classes)} class folder(s) "
            f"({', '.join(classes) or 'none'}): a classifier needs at least 2; put each "
            "class's images in a sub-folder of its own"
        )
    train_paths = [path for path, _ in train_folder.samples]
    train_targets = [target for _, target in train_folder.samples]
    if val_folder is not None:
        unknown = sorted(set(val_folder.classes) - set(classes))
        if unknown:
            raise DataError(
                f"image folder {root / 'val'} has classes that {train_root} does not: "
                f"{', '.join(unknown)}; give both folders the same class sub-folders"
            )
        index = {name: position for position, name in enumerate(classes)}
        val_paths = [path for path, _ in val_folder.samples]
        val_targets = [index[val_folder.classes[target]] for _, target in val_folder.samples]
        split = "train/ and val/"
    else:
        held = _held_out(torch.tensor(train_targets), val_fraction, seed)
        if not held.any():
            raise DataError(
                f"image folder {train_root}: --val-fraction {val_fraction:g} holds out no image "
                "(each class needs at least 2 images, one kept for training); add images, "
                "raise --val-fraction, or give train/ and val/ folders"
            )
        val_paths = [path for path, out in zip(train_paths, held.tolist(), strict=True) if out]
        val_targets = [t for t, out in zip(train_targets, held.tolist(), strict=True) if out]
        train_paths = [
            path for path, out in zip(train_paths, held.tolist(), strict=True) if not out
        ]
        train_targets = [t for t, out in zip(train_targets, held.tolist(), strict=True) if not out]
        split = f"{val_fraction:g} of each class held out, seed {seed}"

    mode, size, resized = _survey([*train_paths, *val_paths])
    channels, (height, width) = (1 if mode == "L" else 3), size
    total = len(train_paths) + len(val_paths)
    decoded_bytes = total * channels * height * width * 4
    source = f"image folder {root} ({split})"
    counts = (
        f"{len(classes)} classes, {len(train_paths):,} training / {len(val_paths):,} held-out "
        f"images ({split}), {channels}x{height}x{width}"
    )
    if resized:
        counts += (
            f"; {resized:,} images of other sizes scaled and centre-cropped to {height}x{width}"
        )
    if decoded_bytes <= memory_limit:
        train_pixels = _decode_all(train_paths, mode, size)
        val_pixels = _decode_all(val_paths, mode, size)
        normalization = _statistics(train_pixels)
        log(f"image folder {root}: {counts}; decoded into memory ({decoded_bytes / 2**30:.2f} GiB)")
        return (
            _tensor_set(train_pixels, train_targets, classes, normalization, source),
            _tensor_set(val_pixels, val_targets, classes, normalization, source),
        )
    workers = workers if workers is not None else max(1, min(4, available_cpus() - 1))
    sample = torch.randperm(len(train_paths), generator=torch.Generator().manual_seed(seed))
    sample = sample[:STATISTICS_SAMPLE].sort().values
    normalization = _statistics(_decode_all([train_paths[i] for i in sample], mode, size))
    log(
        f"image folder {root}: {counts}; streamed from disk by {workers} DataLoader worker(s) "
        f"(decoded, they would take {decoded_bytes / 2**30:.1f} GiB, above "
        f"{memory_limit / 2**30:.1f} GiB); normalised with the statistics of {len(sample):,} "
        "training images (seeded sample)"
    )
    return (
        ImageFiles(
            train_paths,
            torch.tensor(train_targets),
            classes,
            normalization,
            source,
            workers,
            mode,
            size,
        ),
        ImageFiles(
            val_paths,
            torch.tensor(val_targets),
            classes,
            normalization,
            source,
            workers,
            mode,
            size,
        ),
    )


def _held_out(targets: Tensor, fraction: float, seed: int) -> Tensor:
    """Boolean [N]: a seeded `fraction` of each class, rounded, at least one image kept."""
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(targets.shape[0], dtype=torch.bool)
    for label in targets.unique().tolist():
        members = torch.nonzero(targets == label).flatten()
        count = min(round(fraction * members.numel()), members.numel() - 1)
        if count > 0:
            chosen = members[torch.randperm(members.numel(), generator=generator)[:count]]
            held[chosen] = True
    return held


def _bad_image(path: str, error: BaseException) -> DataError:
    reason = " ".join(str(error).split()) or type(error).__name__
    return DataError(
        f"image folder: {path} is not a readable image ({reason}); remove or replace it"
    )


def _survey(paths: Sequence[str]) -> tuple[str, tuple[int, int], int]:
    """Open every file's header: the common mode and size, and how many must be resized.

    Returns:
        `(mode, (height, width), resized)`: `"L"` when every image is grey, else `"RGB"`;
        the most common size; the number of images of another size.

    Raises:
        DataError: naming the first file that is not a readable image.
    """
    from PIL import Image

    modes, sizes = set(), Counter()
    for path in paths:
        try:
            with Image.open(path) as image:
                modes.add(image.mode)
                sizes[image.size] += 1  # (width, height)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise _bad_image(path, error) from None
    (width, height), most = sizes.most_common(1)[0]
    mode = "L" if modes <= set(_GREY_MODES) else "RGB"
    return mode, (height, width), len(paths) - most


def _eight_bit(image: Any) -> Any:
    """A 16-bit grey image scaled to 8 bits (PIL's `convert("L")` would clip it at 255).

    Raises:
        ValueError: a 32-bit integer or float image: its range is not fixed, so exigo cannot
            tell what is white (`_decode` names the file).
    """
    from PIL import Image

    if image.mode.startswith("I;16"):
        scaled = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode in ("I", "F"):
        raise ValueError(
            f"a {'32-bit integer' if image.mode == 'I' else 'floating-point'} image has no fixed "
            "range; save it with 8 or 16 bits per channel"
        )
    return image


def _decode(path: str, mode: str, size: tuple[int, int]) -> Tensor:
    """One image as uint8 [C, H, W] in `mode`, fitted to `size` (height, width) if needed."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            image = _eight_bit(opened).convert(mode)
            if image.size != (size[1], size[0]):
                image = ImageOps.fit(image, (size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise _bad_image(path, error) from None
    return torch.from_numpy(array.copy()).reshape(size[0], size[1], -1).permute(2, 0, 1)


def _decode_all(paths: Sequence[str], mode: str, size: tuple[int, int]) -> Tensor:
    """Float32 [N, C, H, W] intensities in [0, 1]."""
    channels = 1 if mode == "L" else 3
    pixels = torch.empty(len(paths), channels, *size)
    for index, path in enumerate(paths):
        pixels[index] = _decode(path, mode, size)
    return pixels.div_(255)


def _statistics(pixels: Tensor) -> Normalization:
    """Per-channel mean and standard deviation of intensities [N, C, H, W] (std >= 1e-3).

    Summed in float64, 1,024 images at a time (a float64 copy of the whole set would double
    its memory).
    """
    total = torch.zeros(pixels.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in pixels.split(1024):
        values = chunk.double()
        total += values.sum(dim=(0, 2, 3))
        squares += values.square().sum(dim=(0, 2, 3))
    count = pixels.numel() / pixels.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    return Normalization(
        mean=tuple(round(v, 6) for v in mean.tolist()), std=tuple(round(v, 6) for v in std.tolist())
    )


def _tensor_set(
    pixels: Tensor,
    targets: Sequence[int],
    classes: Sequence[str],
    normalization: Normalization,
    source: str,
) -> TensorImageDataset:
    mean, std = normalization.stats(pixels)
    images = pixels.sub_(mean).div_(std)  # in place: one copy of the set in memory
    return TensorImageDataset(
        images, torch.tensor(targets, dtype=torch.long), classes, normalization, source=source
    )

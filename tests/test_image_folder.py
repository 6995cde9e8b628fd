"""An image folder of real PNG files: layouts, the split, statistics, streaming, bad input."""

import pytest
import torch
from PIL import Image

from exigo.data import DataError, ImageFiles, TensorImageDataset, iterate_batches, load_dataset
from exigo.data.image_folder import load_image_folder

from dataset_files import write_image_folder

CLASSES = ["circle", "square", "triangle"]


def test_class_folders_are_split_per_class_with_the_seed(tmp_path):
    write_image_folder(tmp_path, CLASSES, per_class=10, size=16)
    lines = []
    train, held_out = load_dataset(
        "imagefolder", tmp_path, val_fraction=0.2, seed=3, log=lines.append
    )
    assert isinstance(train, TensorImageDataset) and train.classes == CLASSES
    assert train.images.shape == (24, 3, 16, 16) and held_out.images.shape == (6, 3, 16, 16)
    assert torch.bincount(held_out.targets).tolist() == [2, 2, 2]  # stratified
    assert len(lines) == 1 and "decoded into memory" in lines[0]
    again, _ = load_dataset("imagefolder", tmp_path, val_fraction=0.2, seed=3, log=print)
    assert torch.equal(again.images, train.images)
    other, _ = load_dataset("imagefolder", tmp_path, val_fraction=0.2, seed=4, log=print)
    assert not torch.equal(other.images, train.images)
    # per-channel statistics of the training pixels: normalised, they have mean 0, std 1
    flat = train.images.transpose(0, 1).flatten(1)
    assert torch.allclose(flat.mean(1), torch.zeros(3), atol=1e-4)
    assert torch.allclose(flat.std(1, correction=0), torch.ones(3), atol=1e-3)
    pixels = train.normalization.denormalize(train.images)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert str(tmp_path) in train.source


def test_train_and_val_folders_are_the_split(tmp_path):
    write_image_folder(tmp_path / "train", CLASSES, per_class=4)
    # a class absent from val/: its own folder indices (0, 1) map to train's (0, 2)
    write_image_folder(tmp_path / "val", [CLASSES[0], CLASSES[2]], per_class=2, seed=1)
    train, held_out = load_image_folder(tmp_path, log=lambda _line: None)
    assert len(train) == 12 and len(held_out) == 4
    assert held_out.classes == CLASSES and held_out.targets.tolist() == [0, 0, 2, 2]


def test_grey_images_stay_one_channel_and_odd_sizes_are_fitted(tmp_path):
    write_image_folder(tmp_path, CLASSES, per_class=4, size=16, mode="L")
    Image.new("L", (20, 12), 255).save(tmp_path / "square" / "wide.png")
    lines = []
    train, _ = load_image_folder(tmp_path, val_fraction=0.25, log=lines.append)
    assert train.images.shape[1:] == (1, 16, 16)
    assert "1 images of other sizes scaled and centre-cropped" in lines[0]


def test_streamed_when_too_large_same_batches_as_in_memory(tmp_path):
    write_image_folder(tmp_path, CLASSES, per_class=4, size=8)
    kept, kept_val = load_image_folder(tmp_path, val_fraction=0.25, log=lambda _line: None)
    lines = []
    streamed, streamed_val = load_image_folder(
        tmp_path, val_fraction=0.25, memory_limit=0, workers=1, log=lines.append
    )
    assert isinstance(streamed, ImageFiles) and streamed.workers == 1
    assert "streamed from disk by 1 DataLoader worker" in lines[0]
    assert streamed.normalization == kept.normalization  # sample = all 9 training images
    order = torch.tensor([3, 0, 7, 1])
    (images, labels), *_ = iterate_batches(streamed, order, batch_size=4)
    assert torch.allclose(images, kept.images[order], atol=1e-6)
    assert torch.equal(labels, kept.targets[order])
    assert torch.equal(streamed_val.targets, kept_val.targets)


def test_fewer_than_two_classes(tmp_path):
    write_image_folder(tmp_path, ["only"], per_class=4)
    with pytest.raises(DataError, match="1 class folder"):
        load_image_folder(tmp_path)


def test_the_first_unreadable_image_is_named(tmp_path):
    write_image_folder(tmp_path, CLASSES, per_class=3)
    (tmp_path / "square" / "000b.png").write_bytes(b"not a png")
    (tmp_path / "triangle" / "zzz.png").write_bytes(b"not a png either")
    with pytest.raises(DataError) as raised:
        load_image_folder(tmp_path)
    assert f"{tmp_path / 'square' / '000b.png'} is not a readable image" in str(raised.value)


def test_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        load_image_folder(tmp_path / "absent")


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path):
    import numpy as np

    write_image_folder(tmp_path, CLASSES, per_class=4, size=8, mode="L")
    for path in (tmp_path / "circle").iterdir():  # 16-bit PNGs, value 40000 of 65535
        Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(path)
    train, _ = load_image_folder(tmp_path, val_fraction=0.25, log=lambda _line: None)
    circles = [train.images[i] for i in range(len(train)) if train.targets[i] == 0]
    pixels = train.normalization.denormalize(torch.stack(circles))
    assert torch.allclose(pixels, torch.full_like(pixels, round(40000 / 257) / 255), atol=1e-4)


def test_a_floating_point_image_is_refused_naming_it(tmp_path):
    import numpy as np

    write_image_folder(tmp_path, CLASSES, per_class=4, size=8, mode="L")
    bad = tmp_path / "square" / "float.tiff"
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(bad)
    with pytest.raises(DataError, match=r"float\.tiff is not a readable image.*no fixed range"):
        load_image_folder(tmp_path, val_fraction=0.25, log=lambda _line: None)

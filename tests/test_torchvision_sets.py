"""Fashion-MNIST, KMNIST, CIFAR-10/100 and SVHN through torchvision's own classes, offline.

The tiny copies are written in the real formats (IDX, pickled batches, .mat). CIFAR and SVHN
copies cannot match torchvision's MD5 checksums, so the tests declare their checksums through
the classes' public `train_list` / `test_list` / `meta` / `split_list` attributes: torchvision's
real loading code then runs on them; without that, the copy is refused (also tested).
"""

import pytest
import torch
from torchvision.datasets import CIFAR10, CIFAR100, SVHN

from exigo.data import DATASETS, DataError, load_dataset
from exigo.data.torchvision_sets import NORMALIZATIONS, TORCHVISION_SETS

from dataset_files import pixels, write_cifar10, write_cifar100, write_mnist_family, write_svhn


def expected_images(name: str, count: int, channels: int, size: int, classes: int, seed: int):
    raw, labels = pixels(count, channels, size, classes, seed)
    return NORMALIZATIONS[name].normalize(torch.from_numpy(raw).float() / 255), labels


@pytest.mark.parametrize(
    ("name", "folder", "first_class"),
    [("fashion-mnist", "FashionMNIST", "T-shirt/top"), ("kmnist", "KMNIST", "o")],
)
def test_idx_families_load_through_torchvision(tmp_path, name, folder, first_class):
    write_mnist_family(tmp_path, folder, train=30, test=10)
    train, held_out = load_dataset(name, tmp_path, download=False)
    assert train.images.shape == (30, 1, 28, 28) and held_out.images.shape == (10, 1, 28, 28)
    assert train.classes[0] == first_class and len(train.classes) == 10
    assert train.normalization == NORMALIZATIONS[name]
    images, labels = expected_images(name, 10, 1, 28, 10, seed=1)
    assert torch.allclose(held_out.images, images, atol=1e-5)
    assert held_out.targets.tolist() == labels.tolist()
    assert name in train.source and str(tmp_path) in train.source


def declare_checksums(monkeypatch, dataset_class, checksums):
    """Tell torchvision the copy's MD5s through the class's public file lists."""
    for attribute in ("train_list", "test_list"):
        files = [[file, checksums[file]] for file, _ in getattr(dataset_class, attribute)]
        monkeypatch.setattr(dataset_class, attribute, files)
    meta = dict(dataset_class.meta, md5=checksums[dataset_class.meta["filename"]])
    monkeypatch.setattr(dataset_class, "meta", meta)


def test_cifar10_pickled_batches(tmp_path, monkeypatch):
    declare_checksums(monkeypatch, CIFAR10, write_cifar10(tmp_path, per_batch=6, test=10))
    train, held_out = load_dataset("cifar10", tmp_path, download=False)
    assert train.images.shape == (30, 3, 32, 32) and held_out.images.shape == (10, 3, 32, 32)
    assert train.classes[:3] == ["airplane", "automobile", "bird"]
    images, labels = expected_images("cifar10", 10, 3, 32, 10, seed=5)  # the test batch
    assert torch.allclose(held_out.images, images, atol=1e-5)  # planes, not pixels interleaved
    assert held_out.targets.tolist() == labels.tolist()


def test_cifar100_fine_labels_and_names(tmp_path, monkeypatch):
    declare_checksums(monkeypatch, CIFAR100, write_cifar100(tmp_path, train=20, test=10))
    train, held_out = load_dataset("cifar100", tmp_path, download=False)
    assert len(train.classes) == 100 and train.classes[7] == "fine7"
    _, labels = expected_images("cifar100", 20, 3, 32, 100, seed=0)
    assert train.targets.tolist() == labels.tolist()
    assert held_out.normalization == NORMALIZATIONS["cifar100"]


def test_svhn_mat_files_map_ten_to_zero(tmp_path, monkeypatch):
    checksums = write_svhn(tmp_path, train=20, test=10)
    split_list = {
        split: [url, file, checksums[file]]
        for split, (url, file, _) in SVHN.split_list.items()
        if file in checksums
    }
    monkeypatch.setattr(SVHN, "split_list", split_list)
    train, held_out = load_dataset("svhn", tmp_path, download=False)
    images, labels = expected_images("svhn", 20, 3, 32, 10, seed=0)
    assert torch.allclose(train.images, images, atol=1e-5)
    assert train.targets.tolist() == labels.tolist() and 0 in train.targets.tolist()
    assert train.classes == [str(d) for d in range(10)] and held_out.images.shape[0] == 10


@pytest.mark.parametrize("download", [False, True])
def test_a_copy_that_fails_the_checksum_is_refused_by_name(tmp_path, monkeypatch, download):
    import torchvision.datasets.cifar

    fetched = []
    monkeypatch.setattr(  # with download on, torchvision would fetch over the user's files
        torchvision.datasets.cifar,
        "download_and_extract_archive",
        lambda *a, **k: fetched.append(a),
    )
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match="do not match torchvision's checksums") as raised:
        load_dataset("cifar10", tmp_path, download=download)
    assert "cifar-10-batches-py" in str(raised.value)
    assert fetched == []


@pytest.mark.parametrize("name", sorted(TORCHVISION_SETS))
def test_absent_files_are_listed(tmp_path, name):
    with pytest.raises(DataError, match="--no-download") as raised:
        load_dataset(name, tmp_path / "none", download=False)
    assert TORCHVISION_SETS[name].files[0].split("/")[-1] in str(raised.value)
    assert not (tmp_path / "none").exists()


def test_a_damaged_idx_file_is_named(tmp_path):
    write_mnist_family(tmp_path, "KMNIST")
    damaged = tmp_path / "KMNIST" / "raw" / "train-images-idx3-ubyte"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    with pytest.raises(DataError, match="corrupt or truncated") as raised:
        load_dataset("kmnist", tmp_path, download=False)
    assert str(damaged) in str(raised.value)


def test_unknown_name_lists_the_names(tmp_path):
    with pytest.raises(DataError) as raised:
        load_dataset("imagenet", tmp_path)
    assert all(name in str(raised.value) for name in DATASETS)

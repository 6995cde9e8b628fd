import pytest
import torch

from exigo.data import (
    MNIST_NORMALIZATION,
    DataError,
    Normalization,
    TensorImageDataset,
    blank_image,
    display_pixels,
    gather,
    iterate_batches,
    load_mnist,
)


def test_normalization_round_trip_and_blank():
    norm = Normalization(mean=(0.5, 0.25), std=(0.5, 0.25))
    pixels = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(norm.denormalize(norm.normalize(pixels)), pixels, atol=1e-6)
    blank = norm.blank((1, 2, 2, 2))
    assert torch.allclose(blank[0, 0], torch.full((2, 2), -1.0))
    assert torch.allclose(blank[0, 1], torch.full((2, 2), -1.0))


def test_blank_image_is_zero_intensity_shaped_like_one_input():
    norm = Normalization(mean=(0.5, 0.25), std=(0.5, 0.25))
    like = torch.ones(3, 2, 4, 5, dtype=torch.float64)
    blank = blank_image(norm, like)
    assert blank.shape == (1, 2, 4, 5) and blank.dtype == torch.float64
    assert torch.equal(norm.denormalize(blank), torch.zeros(1, 2, 4, 5, dtype=torch.float64))
    unknown = blank_image(None, like)  # no normalisation: the all-zero input
    assert torch.equal(unknown, torch.zeros(1, 2, 4, 5, dtype=torch.float64))


def test_batches_visit_indices_in_order():
    data = TensorImageDataset(
        torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10), list("0123456789")
    )
    order = torch.tensor([3, 1, 4, 9, 0])
    batches = list(iterate_batches(data, order, batch_size=2))
    assert [b[1].tolist() for b in batches] == [[3, 1], [4, 9], [0]]
    images, labels = gather(data, [7, 2])
    assert images.flatten().tolist() == [7.0, 2.0] and labels.tolist() == [7, 2]


def test_generic_dataset_goes_through_dataloader():
    plain = [(torch.full((1, 2, 2), float(i)), i % 3) for i in range(7)]
    batches = list(iterate_batches(plain, [6, 5, 4], batch_size=2))
    assert [b[1].tolist() for b in batches] == [[0, 2], [1]]
    assert batches[0][0].shape == (2, 1, 2, 2)


def test_load_real_mnist(mnist_root):
    train, held_out = load_mnist(mnist_root, download=False)
    assert train.images.shape == (8000, 1, 28, 28) and held_out.images.shape == (2000, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.targets.dtype == torch.int64
    assert set(held_out.targets.tolist()) == set(range(10))
    pixels = MNIST_NORMALIZATION.denormalize(train.images)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    (mean,), (std,) = MNIST_NORMALIZATION.mean, MNIST_NORMALIZATION.std
    assert abs(pixels.mean().item() - mean) < 0.01  # the statistics we normalise with
    assert abs(pixels.std().item() - std) < 0.01


def test_missing_data_names_files(tmp_path):
    with pytest.raises(DataError) as raised:
        load_mnist(tmp_path / "nowhere", download=False)
    message = str(raised.value)
    assert "train-images-idx3-ubyte" in message and "--data-dir" in message


def test_truncated_file_is_named(mnist_copy):
    victim = mnist_copy / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    victim.write_bytes(victim.read_bytes()[:5000])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_mnist(mnist_copy, download=False)


def test_display_pixels_undo_the_normalisation_or_stretch_each_image():
    norm = Normalization(mean=(0.5,), std=(0.25,))
    images = torch.tensor([[[[-2.0, 0.0], [2.0, 4.0]]]])  # pixels -0.0, 0.5, 1.0, 1.5
    assert display_pixels(images, norm).flatten().tolist() == [0.0, 0.5, 1.0, 1.0]  # clamped
    two = torch.stack([images[0], 10 * images[0]])
    stretched = display_pixels(two, None)  # unknown normalisation: each image to [0, 1]
    assert torch.allclose(stretched[0].flatten(), torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    assert torch.equal(stretched[0], stretched[1])
    flat = display_pixels(torch.full((1, 1, 2, 2), 3.0), None)
    assert torch.equal(flat, torch.zeros(1, 1, 2, 2))  # no division by zero
